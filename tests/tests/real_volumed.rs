//! Real-kernel end-to-end tests of volumed: the embedded KV server in this
//! process, the `volumed` binary as a child process, real LVM thin pools,
//! dm-crypt and ext4 on a loop device.
//!
//! The daemon is found beside this test binary (`target/<profile>/volumed`):
//! run `cargo build -p volumed` first (`scripts/test-all` does). Run inside
//! the micro-VM:
//! `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=$PWD/target/debug/microvm
//! cargo test -p volume-tests --test real_volumed -- --test-threads=1`

use consul_kv::{ClientConfig, ConsulKv};
use consul_kv_server::{Server, ServerConfig, ServerHandle};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use volume_control::layout::{HostRecord, Layout, Ledger, VolumeSpec, VolumeState, VolumeStatus};
use volume_core::backend::ThinBackend;
use volume_core::keys::KeyEncryptionKey;
use volume_core::names::{HostId, Region, VolumeId, VolumeName, Zone};
use volume_core::units::{Bytes, GIB};
use volume_tests::procs::{project_binary, wait_for, Guarded};
use volume_tests::TestPool;

const HOST: &str = "h1";
/// Creates under emulation take seconds each; leave room.
const CONVERGE: Duration = Duration::from_secs(240);

/// The KV server in this process, on its own runtime.
struct Kv {
    runtime: tokio::runtime::Runtime,
    server: Option<ServerHandle>,
    client: ConsulKv,
}

impl Kv {
    fn start() -> Kv {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = runtime
            .block_on(Server::start(ServerConfig::loopback()))
            .expect("start the KV server");
        let client = ConsulKv::new(
            ClientConfig::new(&server.local_addr().to_string()).expect("client config"),
        )
        .expect("client");
        Kv {
            runtime,
            server: Some(server),
            client,
        }
    }

    fn addr(&self) -> String {
        self.server
            .as_ref()
            .expect("running")
            .local_addr()
            .to_string()
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.runtime
            .block_on(self.client.get(key))
            .expect("KV read")
            .value
            .map(|pair| pair.value)
    }

    fn put(&self, key: &str, value: &[u8]) {
        assert!(self
            .runtime
            .block_on(self.client.put(key, value))
            .expect("KV write"));
    }

    fn status(&self, id: &VolumeId) -> Option<VolumeStatus> {
        let value = self.get(&Layout::default().status(&host(), id))?;
        Some(serde_json::from_slice(&value).expect("status JSON"))
    }

    fn host_record(&self) -> Option<HostRecord> {
        let value = self.get(&Layout::default().host_info(&host()))?;
        Some(serde_json::from_slice(&value).expect("host record JSON"))
    }

    fn put_spec(&self, spec: &VolumeSpec) {
        self.put(
            &Layout::default().desired(&host(), &spec.id),
            &serde_json::to_vec(spec).expect("spec JSON"),
        );
    }
}

impl Drop for Kv {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = self.runtime.block_on(server.shutdown());
        }
    }
}

fn host() -> HostId {
    HostId::new(HOST).expect("host id")
}

fn spec(size: Bytes) -> VolumeSpec {
    VolumeSpec {
        id: VolumeId::generate(),
        name: VolumeName::new("data").expect("name"),
        host: host(),
        region: Region::new("ewr").expect("region"),
        zone: Zone::new("ewr-a").expect("zone"),
        size,
        encrypted: true,
        created_ms: 1,
        destroy: false,
        source: None,
        snapshots: Default::default(),
        auto_extend: None,
    }
}

/// Everything one daemon run needs from its test.
struct Setup<'a> {
    pool: &'a TestPool,
    kv: &'a Kv,
    scratch: &'a Path,
}

impl Setup<'_> {
    fn jails(&self) -> PathBuf {
        self.scratch.join("jails")
    }

    fn start(&self, extra_env: &[(&str, &Path)]) -> Guarded {
        let kek = self.scratch.join("kek");
        if !kek.exists() {
            KeyEncryptionKey::generate()
                .expect("KEK")
                .write_new_file(&kek)
                .expect("write the KEK");
        }
        let mut command = Command::new(project_binary("volumed"));
        command
            .args(["--host", HOST, "--region", "ewr", "--zone", "ewr-a"])
            .args(["--vg", self.pool.vg.as_str(), "--pool", "pool"])
            .arg("--pv")
            .arg(self.pool.loop_path())
            .args(["--pool-data-size", "3GiB"])
            .args(["--consul-addr", &self.kv.addr()])
            .args(["--key-store", "envelope", "--kek-file"])
            .arg(&kek)
            .arg("--jails-dir")
            .arg(self.jails())
            .args(["--jail-uid", "1000", "--jail-gid", "1000"])
            .args(["--listen", "127.0.0.1:0"])
            .args(["--heartbeat-interval", "2s", "--retry-max", "2s"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        for (name, value) in extra_env {
            command.env(name, value);
        }
        Guarded::spawn("volumed", &mut command)
    }
}

/// SIGKILL, as a crash would.
fn kill_hard(volumed: &mut Guarded) {
    let status = volumed.kill_hard().expect("volumed was running");
    assert!(!status.success(), "volumed survived SIGKILL: {status}");
}

/// SIGTERM; the daemon must exit 0 after its running operations.
fn stop(volumed: &mut Guarded) {
    assert!(
        volumed.terminate(Duration::from_secs(60)),
        "volumed did not exit 0 within 60 s of SIGTERM"
    );
}

fn wait_ready(kv: &Kv, id: &VolumeId) -> VolumeStatus {
    wait_for(&format!("{id} to be ready"), CONVERGE, || {
        let status = kv.status(id)?;
        assert_ne!(
            status.state,
            VolumeState::Error,
            "volume failed: {:?}",
            status.error
        );
        (status.state == VolumeState::Ready).then_some(status)
    })
}

fn our_lvs(pool: &TestPool) -> Vec<VolumeId> {
    pool.backend
        .list_thins()
        .expect("list thin LVs")
        .iter()
        .filter_map(|v| VolumeId::from_lv_name(&v.lv))
        .collect()
}

fn destroy_and_wait(kv: &Kv, pool: &TestPool, spec: &VolumeSpec) {
    let mut destroy = spec.clone();
    destroy.destroy = true;
    kv.put_spec(&destroy);
    wait_for("the destroy commit", CONVERGE, || {
        kv.get(&Layout::default().desired(&host(), &spec.id))
            .is_none()
            .then_some(())
    });
    assert!(kv.status(&spec.id).is_none(), "status left after destroy");
    assert!(
        kv.get(&Layout::default().sealed_key(&spec.id)).is_none(),
        "sealed key left after destroy"
    );
    assert!(!our_lvs(pool).contains(&spec.id), "LV left after destroy");
    assert!(!Path::new("/dev/mapper")
        .join(spec.id.crypt_name().as_str())
        .exists());
}

#[test]
fn real_test_volumed_creates_an_encrypted_ext4_volume_and_destroys_it() {
    let pool = TestPool::new("vd-life", Bytes(4 * GIB), Bytes(3 * GIB));
    let kv = Kv::start();
    let scratch = tempfile::tempdir().expect("scratch dir");
    let setup = Setup {
        pool: &pool,
        kv: &kv,
        scratch: scratch.path(),
    };
    let mut volumed = setup.start(&[]);

    // Over-committed: 10 GiB in a 3 GiB pool, reserved as volctl would.
    let volume = spec(Bytes(10 * GIB));
    kv.put(
        &Layout::default().host_ledger(&host()),
        &serde_json::to_vec(&Ledger {
            reserved: volume.size,
            volumes: 1,
        })
        .expect("ledger JSON"),
    );
    kv.put_spec(&volume);
    let ready = wait_ready(&kv, &volume.id);
    assert!(ready.encrypted);
    assert_eq!(ready.size, Bytes(10 * GIB));
    let device = PathBuf::from(ready.device.expect("device in the status"));
    assert_eq!(
        device,
        Path::new("/dev/mapper").join(volume.id.crypt_name().as_str())
    );
    match volume_core::fs::probe(&device).expect("probe the mapping") {
        volume_core::fs::Signature::Ext(_) => {}
        other => panic!("the mapping holds {other}, not ext4"),
    }
    let lv = pool
        .backend
        .list_thins()
        .expect("list")
        .into_iter()
        .find(|v| VolumeId::from_lv_name(&v.lv).as_ref() == Some(&volume.id))
        .expect("the volume's LV");
    let lv_device = lv.device.expect("active LV");
    assert!(matches!(
        volume_core::fs::probe(&lv_device).expect("probe the LV"),
        volume_core::fs::Signature::Luks
    ));
    // The jail node is the mapping's block device, owned as configured.
    let node = PathBuf::from(ready.node.expect("node in the status"));
    assert_eq!(node, setup.jails().join(volume.id.as_str()).join("vol"));
    let node_meta = std::fs::symlink_metadata(&node).expect("jail node");
    assert!(node_meta.file_type().is_block_device());
    assert_eq!(
        node_meta.rdev(),
        std::fs::metadata(&device).expect("mapping").rdev()
    );
    assert_eq!((node_meta.uid(), node_meta.gid()), (1000, 1000));
    // Only the sealed key is in the store.
    let sealed = kv
        .get(&Layout::default().sealed_key(&volume.id))
        .expect("sealed key");
    assert_eq!(sealed.len(), 1 + 24 + 64 + 16);
    let record = wait_for("the host record", CONVERGE, || {
        kv.host_record().filter(|r| r.pool.volume_count == 1)
    });
    assert!(record.orphans.is_empty());
    assert_eq!(record.pool.provisioned, Bytes(10 * GIB));

    destroy_and_wait(&kv, &pool, &volume);
    assert!(!node.exists(), "jail node left after destroy");
    let ledger: Ledger = serde_json::from_slice(
        &kv.get(&Layout::default().host_ledger(&host()))
            .expect("ledger"),
    )
    .expect("ledger JSON");
    assert_eq!(ledger, Ledger::default());
    stop(&mut volumed);
}

#[test]
fn real_test_volumed_killed_mid_create_converges_after_restart() {
    let pool = TestPool::new("vd-crash", Bytes(4 * GIB), Bytes(3 * GIB));
    let kv = Kv::start();
    let scratch = tempfile::tempdir().expect("scratch dir");
    let setup = Setup {
        pool: &pool,
        kv: &kv,
        scratch: scratch.path(),
    };
    let marker = scratch.path().join("paused");
    let mut volumed = setup.start(&[
        ("VOLUMED_FAULT_PAUSE_AFTER", Path::new("CryptFormatted")),
        ("VOLUMED_FAULT_MARKER", &marker),
    ]);
    let volume = spec(Bytes(2 * GIB));
    kv.put_spec(&volume);
    // The create has made the key, the LV and the LUKS2 header, and holds
    // there: kill -9 now.
    wait_for("the create to reach the LUKS2 format", CONVERGE, || {
        marker.exists().then_some(())
    });
    kill_hard(&mut volumed);
    assert_eq!(our_lvs(&pool), vec![volume.id.clone()]);
    assert_eq!(
        kv.status(&volume.id).expect("status").state,
        VolumeState::Creating
    );

    let mut volumed = setup.start(&[]);
    let ready = wait_ready(&kv, &volume.id);
    assert!(ready.encrypted);
    let device = PathBuf::from(ready.device.expect("device"));
    assert!(matches!(
        volume_core::fs::probe(&device).expect("probe the mapping"),
        volume_core::fs::Signature::Ext(_)
    ));
    let record = wait_for("a fresh host record", CONVERGE, || {
        kv.host_record().filter(|r| r.pool.volume_count == 1)
    });
    assert!(record.orphans.is_empty(), "orphans: {:?}", record.orphans);
    assert_eq!(our_lvs(&pool), vec![volume.id.clone()]);

    destroy_and_wait(&kv, &pool, &volume);
    assert!(our_lvs(&pool).is_empty());
    stop(&mut volumed);
}

//! The whole data path of one host for a real-kernel test: a fresh thin
//! pool, a key directory, a scratch directory (jail, mount points), and
//! the small file-system helpers the data path and snapshot tests share.

use crate::TestPool;
use nix::mount::{mount, MsFlags};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use volume_core::backend::lvm::LvmBackend;
use volume_core::backend::ThinBackend;
use volume_core::host::{Encryption, NewVolume, RealDevices, VolumeHost};
use volume_core::jail::JailPath;
use volume_core::keys::LocalKeyDir;
use volume_core::names::{VolumeId, VolumeName};
use volume_core::units::{Bytes, GIB};

/// A 3 GiB pool on a 4 GiB loop file, keys and a scratch directory with
/// `jail/dev/` and `mnt/` in it.
pub struct Stack {
    pub pool: TestPool,
    pub keys: Arc<LocalKeyDir>,
    pub scratch: tempfile::TempDir,
}

impl Stack {
    pub fn new(test: &str) -> Stack {
        let pool = TestPool::new(test, Bytes(4 * GIB), Bytes(3 * GIB));
        let _ = pool.backend.ensure_pool().expect("ensure pool");
        let scratch = tempfile::tempdir().expect("scratch dir");
        fs::create_dir_all(scratch.path().join("jail/dev")).expect("jail dir");
        fs::create_dir(scratch.path().join("mnt")).expect("mount dir");
        let keys = Arc::new(LocalKeyDir::open(scratch.path().join("keys")).expect("key dir"));
        Stack {
            pool,
            keys,
            scratch,
        }
    }

    /// A fresh host, as after a daemon restart: new LVM backend, new
    /// devices, same key directory.
    pub fn host(&self) -> VolumeHost {
        let backend = LvmBackend::start(self.pool.spec().clone()).expect("LVM backend");
        VolumeHost::new(
            Arc::new(backend),
            Arc::new(RealDevices::locate().expect("e2fsprogs in the guest")),
            self.keys.clone(),
            Default::default(),
        )
    }

    /// The jail node `dev/vdb` in the scratch jail.
    pub fn jail(&self) -> JailPath {
        JailPath::new(self.scratch.path().join("jail"), "dev/vdb").expect("jail path")
    }

    /// The default mount point.
    pub fn mnt(&self) -> PathBuf {
        self.scratch.path().join("mnt")
    }

    /// A directory `name` in the scratch directory (made if missing), for
    /// a second mount point.
    pub fn dir(&self, name: &str) -> PathBuf {
        let dir = self.scratch.path().join(name);
        fs::create_dir_all(&dir).expect("scratch subdirectory");
        dir
    }

    /// The volume's LV device node.
    pub fn lv_path(&self, id: &VolumeId) -> PathBuf {
        Path::new("/dev")
            .join(self.pool.vg.as_str())
            .join(id.lv_name().as_str())
    }
}

/// A new volume named `data` with a fresh id.
pub fn new_volume(size: Bytes, encryption: Encryption) -> NewVolume {
    NewVolume {
        id: VolumeId::generate(),
        name: VolumeName::new("data").expect("volume name"),
        size,
        encryption,
    }
}

pub fn mount_ext4(device: &Path, target: &Path) {
    mount(
        Some(device),
        target,
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap_or_else(|e| panic!("mount {} on {}: {e}", device.display(), target.display()));
}

/// `len` bytes that differ for each `seed` and are not all one value.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + usize::from(seed)) % 251) as u8)
        .collect()
}

/// Writes `data` to a new (or truncated) file and syncs it.
pub fn write_synced(path: &Path, data: &[u8]) {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.write_all(data).expect("write");
    file.sync_all().expect("fsync");
}

/// `e2fsck -fn`: exit 0 means clean.
pub fn fsck_clean(device: &Path) {
    let out = std::process::Command::new("e2fsck")
        .args(["-fn"])
        .arg(device)
        .output()
        .expect("run e2fsck");
    assert!(
        out.status.success(),
        "e2fsck -fn {}: {}\n{}{}",
        device.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

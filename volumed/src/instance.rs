//! One volumed per host: per volume group on this machine, and per host id
//! across machines.
//!
//! * **Same machine, same VG**: an exclusive `flock` on
//!   `<run dir>/<vg>.lock`, held for the daemon's life and released by the
//!   kernel when the process dies (even by `kill -9`), so a stale file never
//!   blocks a restart. The file names the holder (`pid <pid> host <id>`).
//! * **Same host id elsewhere**: the host record names its `owner`
//!   (`<machine id>:<vg>`). A daemon refuses to start while another owner's
//!   heartbeat is fresh (younger than [`stale_after`]). The KV API the
//!   project uses has no sessions, so this is a liveness check, not a lock:
//!   two daemons started on two machines within one heartbeat of each other
//!   can both pass, and a store that cannot be read at start-up skips the
//!   check (the daemon must serve its volumes while the store is away).

use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;
use volume_control::layout::{HostRecord, Layout};
use volume_core::names::{HostId, VgName};

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("cannot make the run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the lock file {path}: {source}")]
    LockFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another volumed already serves volume group {vg} ({holder}; it holds {path})")]
    VgTaken {
        vg: VgName,
        holder: String,
        path: PathBuf,
    },
    #[error("host id {host} is served by another volumed ({owner}, last heartbeat {age_secs}s ago); refusing to start. If it is gone for good, start again once its heartbeat is {stale_secs}s old")]
    HostTaken {
        host: HostId,
        owner: String,
        age_secs: u64,
        stale_secs: u64,
    },
}

/// Held while the daemon runs; the kernel drops the lock with the process.
#[derive(Debug)]
pub struct VgLock {
    _lock: Flock<File>,
}

/// Takes the volume group's lock, or names the daemon that holds it.
pub fn lock_vg(run_dir: &Path, vg: &VgName, host: &HostId) -> Result<VgLock, InstanceError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(run_dir)
        .map_err(|source| InstanceError::RunDir {
            path: run_dir.to_owned(),
            source,
        })?;
    let path = run_dir.join(format!("{vg}.lock"));
    let lock_error = |source| InstanceError::LockFile {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(lock_error)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "holder unknown".to_owned(),
                text => text.to_owned(),
            };
            return Err(InstanceError::VgTaken {
                vg: vg.clone(),
                holder,
                path,
            });
        }
        Err((_, errno)) => return Err(lock_error(errno.into())),
    };
    let record = format!("pid {} host {host}\n", std::process::id());
    lock.set_len(0).map_err(lock_error)?;
    lock.rewind().map_err(lock_error)?;
    lock.write_all(record.as_bytes()).map_err(lock_error)?;
    Ok(VgLock { _lock: lock })
}

/// This daemon's identity in the host record: the machine and the VG.
pub fn owner(vg: &VgName) -> String {
    let machine = std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown-machine".to_owned());
    format!("{machine}:{vg}")
}

/// How old another owner's heartbeat must be before its host id is free.
pub fn stale_after(heartbeat_interval: Duration) -> Duration {
    (heartbeat_interval * 3).max(Duration::from_secs(30))
}

/// Refuses to start while another owner's heartbeat for `host` is fresh.
pub async fn check_host_owner(
    kv: &consul_kv::ConsulKv,
    layout: &Layout,
    host: &HostId,
    owner: &str,
    heartbeat_interval: Duration,
    now_ms: u64,
) -> Result<(), InstanceError> {
    let answer = match kv.get(&layout.host_info(host)).await {
        Ok(answer) => answer,
        Err(error) => {
            tracing::warn!(%error, "cannot read the host record; starting without checking that no other daemon serves this host id");
            return Ok(());
        }
    };
    let Some(record) = answer
        .value
        .and_then(|pair| serde_json::from_slice::<HostRecord>(&pair.value).ok())
    else {
        return Ok(());
    };
    let Some(other) = record.owner.filter(|other| other != owner) else {
        return Ok(());
    };
    let age = Duration::from_millis(now_ms.saturating_sub(record.heartbeat_ms));
    let stale = stale_after(heartbeat_interval);
    if age >= stale {
        tracing::info!(previous = %other, "taking over a host id whose daemon stopped publishing");
        return Ok(());
    }
    Err(InstanceError::HostTaken {
        host: host.clone(),
        owner: other,
        age_secs: age.as_secs(),
        stale_secs: stale.as_secs(),
    })
}

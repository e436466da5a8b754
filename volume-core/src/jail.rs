//! Exposing a volume's block device inside a jail directory.
//!
//! A node is an `S_IFBLK` inode made with `mknodat` from the device's current
//! `st_rdev`, mode `0600`, owned by the uid:gid the caller gives. Paths are
//! resolved with `openat2(RESOLVE_NO_SYMLINKS)` for the jail root and
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` below it, so a symlink
//! or `..` anywhere is refused by the kernel, not by string checks alone.
//!
//! Ownership is provable: every node this module makes carries the extended
//! attribute `trusted.vmv1.volume=<volume id>`. `trusted.*` attributes can
//! only be read or written with `CAP_SYS_ADMIN`, so a jailed process can
//! neither forge nor strip the mark (`user.*` attributes are not allowed on
//! device nodes at all). An existing node without our mark, or marked for
//! another volume, is never touched. A marked node whose device number is
//! stale (a dm minor can change when a device is re-activated) is replaced
//! atomically: the new node is made under a temporary name and renamed over
//! the old one.

use crate::actions::{CreateAction, DeleteAction};
use crate::names::VolumeId;
use nix::errno::Errno;
use nix::fcntl::{openat2, renameat, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::sys::stat::{fstatat, mknodat, Mode, SFlag};
use nix::unistd::{fchownat, unlinkat, Gid, Uid, UnlinkatFlags};
use std::ffi::OsStr;
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The extended attribute that marks a node as made by this project for a
/// given volume.
pub const OWNER_XATTR: &str = "trusted.vmv1.volume";
/// Permission bits of every node made here.
pub const NODE_MODE: u32 = 0o600;

/// A device number (`st_rdev`), shown as `major:minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceNumber(pub u64);

impl DeviceNumber {
    pub fn new(major: u64, minor: u64) -> DeviceNumber {
        DeviceNumber(nix::sys::stat::makedev(major, minor))
    }
    pub fn major(self) -> u64 {
        nix::sys::stat::major(self.0)
    }
    pub fn minor(self) -> u64 {
        nix::sys::stat::minor(self.0)
    }
}

impl fmt::Display for DeviceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major(), self.minor())
    }
}

/// Who owns an exposed node: the jailed process's uid and gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeOwner {
    pub uid: u32,
    pub gid: u32,
}

pub use volume_model::jail_path::{BadJailPath, JailPath};

/// One variant per failing step; each carries the path and the OS error.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(transparent)]
    BadPath(#[from] BadJailPath),
    #[error("{path} is or passes through a symlink; refusing to resolve it")]
    Symlink { path: PathBuf },
    #[error("{path} resolves outside the jail root")]
    Escapes { path: PathBuf },
    #[error("could not open directory {path}: {source}")]
    OpenDir {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("could not stat {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("{path} is not a block device")]
    NotABlockDevice { path: PathBuf },
    #[error("{path} exists and is not a node of this project for volume {volume} ({found}); refusing to touch it")]
    Foreign {
        path: PathBuf,
        volume: VolumeId,
        found: String,
    },
    #[error("could not make device node {path} ({rdev}): {source}")]
    Mknod {
        path: PathBuf,
        rdev: DeviceNumber,
        #[source]
        source: Errno,
    },
    #[error("could not chown {path} to {uid}:{gid}: {source}")]
    Chown {
        path: PathBuf,
        uid: u32,
        gid: u32,
        #[source]
        source: Errno,
    },
    #[error("could not mark {path} with {OWNER_XATTR}: {source}")]
    Mark {
        path: PathBuf,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("could not read the mark of {path}: {source}")]
    ReadMark {
        path: PathBuf,
        #[source]
        source: rustix::io::Errno,
    },
    #[error("{path} has mode {mode:04o} after mknod, not {NODE_MODE:04o} (umask?)")]
    Mode { path: PathBuf, mode: u32 },
    #[error("could not move the new node into place at {path}: {source}")]
    Rename {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("could not remove {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

/// A node this module made or found in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposedNode {
    pub path: PathBuf,
    pub rdev: DeviceNumber,
    pub owner: NodeOwner,
    /// The device number of a stale node of ours that was replaced.
    pub replaced: Option<DeviceNumber>,
}

/// The current device number of a block device (follows symlinks such as
/// `/dev/<vg>/<lv>`).
pub fn device_number(device: &Path) -> Result<DeviceNumber, JailError> {
    let stat = nix::sys::stat::stat(device).map_err(|source| JailError::Stat {
        path: device.to_owned(),
        source,
    })?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFBLK {
        return Err(JailError::NotABlockDevice {
            path: device.to_owned(),
        });
    }
    Ok(DeviceNumber(stat.st_rdev))
}

fn map_resolve_error(path: &Path, source: Errno) -> JailError {
    match source {
        Errno::ELOOP => JailError::Symlink {
            path: path.to_owned(),
        },
        Errno::EXDEV => JailError::Escapes {
            path: path.to_owned(),
        },
        _ => JailError::OpenDir {
            path: path.to_owned(),
            source,
        },
    }
}

/// Opens the directory that holds the node, refusing symlinks anywhere.
fn open_parent(jail: &JailPath) -> Result<OwnedFd, JailError> {
    let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let root = openat2(
        AT_FDCWD,
        jail.root(),
        OpenHow::new()
            .flags(dir_flags)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS),
    )
    .map_err(|e| map_resolve_error(jail.root(), e))?;
    let (parent, _) = jail.split();
    if parent.as_os_str().is_empty() {
        return Ok(root);
    }
    openat2(
        &root,
        parent,
        OpenHow::new().flags(dir_flags).resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        ),
    )
    .map_err(|e| map_resolve_error(&jail.root().join(parent), e))
}

/// `name` inside the directory `dir` as a path the xattr calls can use
/// without resolving anything again: the magic link names exactly the
/// directory we opened, and the `l*` calls do not follow a final symlink.
fn through_fd(dir: &OwnedFd, name: &OsStr) -> PathBuf {
    let mut path = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    path.push(name);
    path
}

/// What sits at a name: nothing, or an inode with its type, rdev and mark.
struct Existing {
    is_block: bool,
    rdev: DeviceNumber,
    uid: u32,
    gid: u32,
    mode: u32,
    mark: Option<String>,
}

fn inspect(dir: &OwnedFd, name: &OsStr, shown: &Path) -> Result<Option<Existing>, JailError> {
    let stat = match fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::ENOENT) => return Ok(None),
        Err(source) => {
            return Err(JailError::Stat {
                path: shown.to_owned(),
                source,
            })
        }
    };
    let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    let mark = if kind == SFlag::S_IFLNK {
        None
    } else {
        read_mark(dir, name, shown)?
    };
    Ok(Some(Existing {
        is_block: kind == SFlag::S_IFBLK,
        rdev: DeviceNumber(stat.st_rdev),
        uid: stat.st_uid,
        gid: stat.st_gid,
        mode: stat.st_mode & 0o7777,
        mark,
    }))
}

fn read_mark(dir: &OwnedFd, name: &OsStr, shown: &Path) -> Result<Option<String>, JailError> {
    let mut value = [0u8; 64];
    match rustix::fs::lgetxattr(through_fd(dir, name), OWNER_XATTR, &mut value[..]) {
        Ok(len) => Ok(Some(String::from_utf8_lossy(&value[..len]).into_owned())),
        Err(rustix::io::Errno::NODATA) => Ok(None),
        // A mark longer than any volume id is not ours.
        Err(rustix::io::Errno::RANGE) => Ok(Some("<oversized mark>".to_owned())),
        Err(source) => Err(JailError::ReadMark {
            path: shown.to_owned(),
            source,
        }),
    }
}

fn describe(existing: &Existing) -> String {
    let what = if existing.is_block {
        format!("block device {}", existing.rdev)
    } else {
        "not a block device".to_owned()
    };
    match &existing.mark {
        Some(mark) => format!("{what}, marked for {mark}"),
        None => format!("{what}, no {OWNER_XATTR} mark"),
    }
}

/// Makes a marked, owned node at `name` in `dir`.
fn make_node(
    dir: &OwnedFd,
    name: &OsStr,
    shown: &Path,
    rdev: DeviceNumber,
    owner: NodeOwner,
    volume: &VolumeId,
) -> Result<(), JailError> {
    mknodat(
        dir,
        name,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(NODE_MODE),
        rdev.0,
    )
    .map_err(|source| JailError::Mknod {
        path: shown.to_owned(),
        rdev,
        source,
    })?;
    let finish = || -> Result<(), JailError> {
        // Marked first: a node that exists is provably ours from here on.
        rustix::fs::lsetxattr(
            through_fd(dir, name),
            OWNER_XATTR,
            volume.as_str().as_bytes(),
            rustix::fs::XattrFlags::CREATE,
        )
        .map_err(|source| JailError::Mark {
            path: shown.to_owned(),
            source,
        })?;
        fchownat(
            dir,
            name,
            Some(Uid::from_raw(owner.uid)),
            Some(Gid::from_raw(owner.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|source| JailError::Chown {
            path: shown.to_owned(),
            uid: owner.uid,
            gid: owner.gid,
            source,
        })?;
        let stat =
            fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|source| {
                JailError::Stat {
                    path: shown.to_owned(),
                    source,
                }
            })?;
        if stat.st_mode & 0o7777 != NODE_MODE {
            return Err(JailError::Mode {
                path: shown.to_owned(),
                mode: stat.st_mode & 0o7777,
            });
        }
        Ok(())
    };
    finish().inspect_err(|_| {
        // Do not leave a half-made node behind; it was made just now.
        let _ = unlinkat(dir, name, UnlinkatFlags::NoRemoveDir);
    })
}

fn temp_name(name: &OsStr) -> std::ffi::OsString {
    let mut temp = std::ffi::OsString::from(".");
    temp.push(name);
    temp.push(".vmv1-new");
    temp
}

/// Removes a leftover temporary node of ours (from a crash); refuses
/// anything else at that name.
fn clear_temp(
    dir: &OwnedFd,
    temp: &OsStr,
    shown: &Path,
    volume: &VolumeId,
) -> Result<(), JailError> {
    match inspect(dir, temp, shown)? {
        None => Ok(()),
        Some(existing)
            if existing.is_block && existing.mark.as_deref() == Some(volume.as_str()) =>
        {
            unlinkat(dir, temp, UnlinkatFlags::NoRemoveDir).map_err(|source| JailError::Remove {
                path: shown.to_owned(),
                source,
            })
        }
        Some(existing) => Err(JailError::Foreign {
            path: shown.to_owned(),
            volume: volume.clone(),
            found: describe(&existing),
        }),
    }
}

/// Exposes the block device `rdev` of `volume` at `jail`.
///
/// * Nothing there: a node is made → `Created`.
/// * Our node for this volume with the same rdev, owner and mode → `Identity`.
/// * Our node for this volume, stale (other rdev, owner or mode) → replaced
///   atomically → `Created` with [`ExposedNode::replaced`] set.
/// * Anything else (no mark, another volume's mark, not a block device, a
///   symlink) → [`JailError::Foreign`]; nothing is changed.
pub fn expose(
    jail: &JailPath,
    rdev: DeviceNumber,
    owner: NodeOwner,
    volume: &VolumeId,
) -> Result<CreateAction<ExposedNode>, JailError> {
    let dir = open_parent(jail)?;
    let (_, name) = jail.split();
    let shown = jail.full();
    let node = |replaced| ExposedNode {
        path: shown.clone(),
        rdev,
        owner,
        replaced,
    };
    let replaced = match inspect(&dir, name, &shown)? {
        None => None,
        Some(existing) => {
            let ours = existing.is_block && existing.mark.as_deref() == Some(volume.as_str());
            if !ours {
                return Err(JailError::Foreign {
                    path: shown,
                    volume: volume.clone(),
                    found: describe(&existing),
                });
            }
            if existing.rdev == rdev
                && existing.uid == owner.uid
                && existing.gid == owner.gid
                && existing.mode == NODE_MODE
            {
                return Ok(CreateAction::Identity(node(None)));
            }
            Some(existing.rdev)
        }
    };
    let temp = temp_name(name);
    let temp_shown = shown.with_file_name(&temp);
    clear_temp(&dir, &temp, &temp_shown, volume)?;
    make_node(&dir, &temp, &temp_shown, rdev, owner, volume)?;
    let moved = match replaced {
        // Nothing was there: refuse to clobber a node that appeared since.
        None => nix::fcntl::renameat2(
            &dir,
            temp.as_os_str(),
            &dir,
            name,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        ),
        Some(_) => renameat(&dir, temp.as_os_str(), &dir, name),
    };
    if let Err(source) = moved {
        let _ = unlinkat(&dir, temp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        return Err(JailError::Rename {
            path: shown,
            source,
        });
    }
    if let Some(old) = replaced {
        tracing::info!(node = %shown.display(), %old, new = %rdev, "replaced stale device node");
    }
    Ok(CreateAction::Created(node(replaced)))
}

/// Removes the node at `jail` if, and only if, it is ours for `volume`. A
/// missing node (or missing jail directory) is `Identity`.
pub fn unexpose(jail: &JailPath, volume: &VolumeId) -> Result<DeleteAction, JailError> {
    let dir = match open_parent(jail) {
        Ok(dir) => dir,
        Err(JailError::OpenDir {
            source: Errno::ENOENT,
            ..
        }) => return Ok(DeleteAction::Identity),
        Err(other) => return Err(other),
    };
    let (_, name) = jail.split();
    let shown = jail.full();
    let temp = temp_name(name);
    clear_temp(&dir, &temp, &shown.with_file_name(&temp), volume)?;
    match inspect(&dir, name, &shown)? {
        None => Ok(DeleteAction::Identity),
        Some(existing)
            if existing.is_block && existing.mark.as_deref() == Some(volume.as_str()) =>
        {
            unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir).map_err(|source| {
                JailError::Remove {
                    path: shown,
                    source,
                }
            })?;
            Ok(DeleteAction::Deleted)
        }
        Some(existing) => Err(JailError::Foreign {
            path: shown,
            volume: volume.clone(),
            found: describe(&existing),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const OWNER: NodeOwner = NodeOwner {
        uid: 1234,
        gid: 5678,
    };

    fn jail_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("dev")).unwrap();
        dir
    }

    fn loop_rdev(minor: u64) -> DeviceNumber {
        DeviceNumber::new(7, minor)
    }

    #[test]
    fn expose_makes_a_marked_owned_0600_block_node() {
        let dir = jail_dir();
        let volume = VolumeId::generate();
        let jail = JailPath::new(dir.path(), "dev/vdb").unwrap();
        let made = expose(&jail, loop_rdev(3), OWNER, &volume).unwrap();
        assert!(made.changed());
        let meta = fs::symlink_metadata(jail.full()).unwrap();
        assert_eq!(meta.mode() & libc::S_IFMT, libc::S_IFBLK);
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!((meta.uid(), meta.gid()), (OWNER.uid, OWNER.gid));
        assert_eq!(meta.rdev(), loop_rdev(3).0);
        let mut mark = [0u8; 64];
        let len = rustix::fs::lgetxattr(jail.full(), OWNER_XATTR, &mut mark[..]).unwrap();
        assert_eq!(&mark[..len], volume.as_str().as_bytes());
        // Again: identity, nothing changes, no temporaries.
        let again = expose(&jail, loop_rdev(3), OWNER, &volume).unwrap();
        assert!(!again.changed());
        assert_eq!(fs::read_dir(dir.path().join("dev")).unwrap().count(), 1);
    }

    #[test]
    fn a_stale_node_of_ours_is_replaced() {
        let dir = jail_dir();
        let volume = VolumeId::generate();
        let jail = JailPath::new(dir.path(), "dev/vdb").unwrap();
        let _ = expose(&jail, loop_rdev(3), OWNER, &volume).unwrap();
        let replaced = expose(&jail, loop_rdev(9), OWNER, &volume).unwrap();
        assert!(replaced.changed());
        assert_eq!(replaced.inner().replaced, Some(loop_rdev(3)));
        assert_eq!(
            fs::symlink_metadata(jail.full()).unwrap().rdev(),
            loop_rdev(9).0
        );
        // A different owner also counts as stale.
        let other_owner = NodeOwner { uid: 1, gid: 1 };
        assert!(expose(&jail, loop_rdev(9), other_owner, &volume)
            .unwrap()
            .changed());
        assert_eq!(fs::symlink_metadata(jail.full()).unwrap().uid(), 1);
        assert_eq!(fs::read_dir(dir.path().join("dev")).unwrap().count(), 1);
    }

    #[test]
    fn foreign_nodes_are_refused_and_left_alone() {
        let dir = jail_dir();
        let volume = VolumeId::generate();
        let jail = JailPath::new(dir.path(), "dev/vdb").unwrap();
        // An unmarked node, even for the very same device.
        mknodat(
            AT_FDCWD,
            &jail.full(),
            SFlag::S_IFBLK,
            Mode::from_bits_truncate(0o600),
            loop_rdev(3).0,
        )
        .unwrap();
        let err = expose(&jail, loop_rdev(3), OWNER, &volume).unwrap_err();
        assert!(matches!(err, JailError::Foreign { .. }), "{err}");
        assert!(
            err.to_string().contains("no trusted.vmv1.volume mark"),
            "{err}"
        );
        assert!(matches!(
            unexpose(&jail, &volume),
            Err(JailError::Foreign { .. })
        ));
        assert!(jail.full().exists());
        // Another volume's node.
        let other = JailPath::new(dir.path(), "dev/vdc").unwrap();
        let other_volume = VolumeId::generate();
        let _ = expose(&other, loop_rdev(4), OWNER, &other_volume).unwrap();
        let err = expose(&other, loop_rdev(5), OWNER, &volume).unwrap_err();
        assert!(err.to_string().contains(other_volume.as_str()), "{err}");
        assert!(unexpose(&other, &volume).is_err());
        assert_eq!(
            fs::symlink_metadata(other.full()).unwrap().rdev(),
            loop_rdev(4).0
        );
        // A regular file.
        fs::write(dir.path().join("dev/vdd"), b"x").unwrap();
        let file = JailPath::new(dir.path(), "dev/vdd").unwrap();
        assert!(matches!(
            expose(&file, loop_rdev(3), OWNER, &volume),
            Err(JailError::Foreign { .. })
        ));
    }

    #[test]
    fn symlinks_anywhere_are_refused() {
        let dir = jail_dir();
        let outside = tempfile::tempdir().unwrap();
        let volume = VolumeId::generate();
        // A symlinked directory inside the jail pointing out of it.
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
        let err = expose(
            &JailPath::new(dir.path(), "out/vdb").unwrap(),
            loop_rdev(3),
            OWNER,
            &volume,
        )
        .unwrap_err();
        assert!(matches!(err, JailError::Symlink { .. }), "{err}");
        // A symlink within the jail, even one that stays inside.
        std::os::unix::fs::symlink("dev", dir.path().join("devlink")).unwrap();
        assert!(matches!(
            expose(
                &JailPath::new(dir.path(), "devlink/vdb").unwrap(),
                loop_rdev(3),
                OWNER,
                &volume
            ),
            Err(JailError::Symlink { .. })
        ));
        // A symlink as the final component is not followed and not replaced.
        std::os::unix::fs::symlink("/dev/null", dir.path().join("dev/vdb")).unwrap();
        assert!(matches!(
            expose(
                &JailPath::new(dir.path(), "dev/vdb").unwrap(),
                loop_rdev(3),
                OWNER,
                &volume
            ),
            Err(JailError::Foreign { .. })
        ));
        // A symlinked jail root.
        let root_link = outside.path().join("jail-link");
        std::os::unix::fs::symlink(dir.path(), &root_link).unwrap();
        assert!(matches!(
            expose(
                &JailPath::new(&root_link, "dev/vdc").unwrap(),
                loop_rdev(3),
                OWNER,
                &volume
            ),
            Err(JailError::Symlink { .. })
        ));
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1);
        assert!(!dir.path().join("dev/vdc").exists());
    }

    #[test]
    fn unexpose_removes_only_our_node_and_is_idempotent() {
        let dir = jail_dir();
        let volume = VolumeId::generate();
        let jail = JailPath::new(dir.path(), "dev/vdb").unwrap();
        assert_eq!(unexpose(&jail, &volume).unwrap(), DeleteAction::Identity);
        let _ = expose(&jail, loop_rdev(3), OWNER, &volume).unwrap();
        assert_eq!(unexpose(&jail, &volume).unwrap(), DeleteAction::Deleted);
        assert!(!jail.full().exists());
        assert_eq!(unexpose(&jail, &volume).unwrap(), DeleteAction::Identity);
        // A jail directory that is gone means the node is gone.
        let gone = JailPath::new(dir.path(), "nope/vdb").unwrap();
        assert_eq!(unexpose(&gone, &volume).unwrap(), DeleteAction::Identity);
    }

    #[test]
    fn a_missing_parent_is_an_error_not_created() {
        let dir = jail_dir();
        let jail = JailPath::new(dir.path(), "missing/vdb").unwrap();
        let err = expose(&jail, loop_rdev(3), OWNER, &VolumeId::generate()).unwrap_err();
        assert!(
            matches!(
                err,
                JailError::OpenDir {
                    source: Errno::ENOENT,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!dir.path().join("missing").exists());
    }

    #[test]
    fn crash_leftover_temporaries_are_cleared_but_foreign_ones_refused() {
        let dir = jail_dir();
        let volume = VolumeId::generate();
        let jail = JailPath::new(dir.path(), "dev/vdb").unwrap();
        // Our leftover temporary (as if we crashed before the rename).
        let temp = JailPath::new(dir.path(), "dev/.vdb.vmv1-new").unwrap();
        let _ = expose(&temp, loop_rdev(1), OWNER, &volume).unwrap();
        let made = expose(&jail, loop_rdev(3), OWNER, &volume).unwrap();
        assert!(made.changed());
        assert!(!temp.full().exists());
        // A foreign file at the temporary name stops us.
        fs::write(temp.full(), b"not ours").unwrap();
        assert!(matches!(
            expose(&jail, loop_rdev(4), OWNER, &volume),
            Err(JailError::Foreign { .. })
        ));
        assert_eq!(fs::read(temp.full()).unwrap(), b"not ours");
    }

    #[test]
    fn device_number_reads_block_devices_only() {
        let dir = jail_dir();
        let volume = VolumeId::generate();
        let jail = JailPath::new(dir.path(), "dev/vdb").unwrap();
        let _ = expose(&jail, loop_rdev(6), OWNER, &volume).unwrap();
        assert_eq!(device_number(&jail.full()).unwrap(), loop_rdev(6));
        assert!(matches!(
            device_number(dir.path()),
            Err(JailError::NotABlockDevice { .. })
        ));
        assert_eq!(loop_rdev(6).to_string(), "7:6");
    }
}

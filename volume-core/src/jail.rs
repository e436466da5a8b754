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
use nix::fcntl::{openat2, renameat, AtFlags, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::sys::stat::{fchmodat, fstat, fstatat, mknodat, FchmodatFlags, FileStat, Mode, SFlag};
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
    #[error("could not set mode {mode:04o} on {path}: {source}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        #[source]
        source: Errno,
    },
    #[error("could not mark {path} with {OWNER_XATTR}: {source}")]
    Mark {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("could not read the mark of {path}: {source}")]
    ReadMark {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("{path} no longer names the node just made ({found}); something swapped it, so nothing was chowned, marked or moved")]
    Swapped { path: PathBuf, found: String },
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
    /// Other hard links the replaced node had (made by someone in the
    /// jail); its inode was made root-owned with mode 0, so they open
    /// nothing.
    pub extra_links: u64,
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

/// The path that names exactly the inode an `O_PATH` descriptor holds. The
/// kernel resolves this magic link to that inode without looking at any
/// directory entry again, so the following `*xattr`/`chmod` calls act on
/// our inode even if its name has been swapped since. (Linux refuses
/// `fsetxattr`/`fchmod` on `O_PATH` descriptors before 6.6/6.12, and the
/// guest kernels here are older.)
fn by_fd(fd: &OwnedFd) -> std::ffi::CString {
    std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .expect("no NUL in a decimal number")
}

fn xattr_name() -> std::ffi::CString {
    std::ffi::CString::new(OWNER_XATTR).expect("constant without NUL")
}

/// Opens `name` in `dir` without following a symlink or opening a device:
/// an `O_PATH` descriptor of whatever inode is there now.
fn open_inode(dir: &OwnedFd, name: &OsStr, shown: &Path) -> Result<Option<OwnedFd>, JailError> {
    match nix::fcntl::openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::ENOENT) => Ok(None),
        Err(source) => Err(JailError::Stat {
            path: shown.to_owned(),
            source,
        }),
    }
}

fn stat_fd(fd: &OwnedFd, shown: &Path) -> Result<FileStat, JailError> {
    fstat(fd).map_err(|source| JailError::Stat {
        path: shown.to_owned(),
        source,
    })
}

/// An inode found at a name, held by an `O_PATH` descriptor, with what was
/// read through that descriptor.
struct Existing {
    fd: OwnedFd,
    stat: FileStat,
    is_block: bool,
    rdev: DeviceNumber,
    mark: Option<String>,
}

impl Existing {
    fn mode(&self) -> u32 {
        self.stat.st_mode & 0o7777
    }

    fn is_ours(&self, volume: &VolumeId) -> bool {
        self.is_block && self.mark.as_deref() == Some(volume.as_str())
    }

    /// Whether `name` in `dir` still names this inode.
    fn still_at(&self, dir: &OwnedFd, name: &OsStr) -> bool {
        fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|now| now.st_dev == self.stat.st_dev && now.st_ino == self.stat.st_ino)
    }
}

fn inspect(dir: &OwnedFd, name: &OsStr, shown: &Path) -> Result<Option<Existing>, JailError> {
    let Some(fd) = open_inode(dir, name, shown)? else {
        return Ok(None);
    };
    let stat = stat_fd(&fd, shown)?;
    let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    // A symlink's own xattrs are never ours; do not resolve through it.
    let mark = if kind == SFlag::S_IFLNK {
        None
    } else {
        read_mark(&fd, shown)?
    };
    Ok(Some(Existing {
        is_block: kind == SFlag::S_IFBLK,
        rdev: DeviceNumber(stat.st_rdev),
        fd,
        stat,
        mark,
    }))
}

fn read_mark(fd: &OwnedFd, shown: &Path) -> Result<Option<String>, JailError> {
    let mut value = [0u8; 64];
    let (path, name) = (by_fd(fd), xattr_name());
    // SAFETY: `path` and `name` are NUL-terminated and live across the
    // call; `value` is writable for the length passed.
    let len = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    match usize::try_from(len) {
        Ok(len) => Ok(Some(String::from_utf8_lossy(&value[..len]).into_owned())),
        Err(_) => match Errno::last() {
            Errno::ENODATA => Ok(None),
            // A mark longer than any volume id is not ours.
            Errno::ERANGE => Ok(Some("<oversized mark>".to_owned())),
            source => Err(JailError::ReadMark {
                path: shown.to_owned(),
                source,
            }),
        },
    }
}

fn write_mark(fd: &OwnedFd, volume: &VolumeId, shown: &Path) -> Result<(), JailError> {
    let (path, name) = (by_fd(fd), xattr_name());
    let value = volume.as_str().as_bytes();
    // SAFETY: `path` and `name` are NUL-terminated and live across the
    // call; `value` is readable for the length passed.
    let done = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            libc::XATTR_CREATE,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(JailError::Mark {
            path: shown.to_owned(),
            source: Errno::last(),
        })
    }
}

fn chown_fd(fd: &OwnedFd, uid: u32, gid: u32, shown: &Path) -> Result<(), JailError> {
    fchownat(
        fd,
        "",
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::AT_EMPTY_PATH,
    )
    .map_err(|source| JailError::Chown {
        path: shown.to_owned(),
        uid,
        gid,
        source,
    })
}

fn chmod_fd(fd: &OwnedFd, mode: u32, shown: &Path) -> Result<(), JailError> {
    fchmodat(
        AT_FDCWD,
        by_fd(fd).as_c_str(),
        Mode::from_bits_truncate(mode),
        FchmodatFlags::FollowSymlink,
    )
    .map_err(|source| JailError::Chmod {
        path: shown.to_owned(),
        mode,
        source,
    })
}

/// Takes every access away from an inode of ours before its name goes:
/// owner root, mode 0. Hard links share the inode, so this reaches links
/// a jail owner made that we cannot find. Returns how many other links
/// the inode has (reported: they stay, harmless).
fn neutralise(node: &Existing, shown: &Path) -> Result<u64, JailError> {
    chown_fd(&node.fd, 0, 0, shown)?;
    chmod_fd(&node.fd, 0, shown)?;
    let extra = stat_fd(&node.fd, shown)?.st_nlink.saturating_sub(1);
    if extra > 0 {
        tracing::warn!(node = %shown.display(), extra_links = extra,
            "our device node had other hard links; they are now root-owned with mode 0");
    }
    Ok(extra)
}

/// Neutralises and unlinks our node at `name`, if the name still refers
/// to it; returns the extra links found.
fn remove_ours(
    dir: &OwnedFd,
    name: &OsStr,
    node: &Existing,
    shown: &Path,
) -> Result<u64, JailError> {
    let extra = neutralise(node, shown)?;
    if node.still_at(dir, name) {
        unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(|source| JailError::Remove {
            path: shown.to_owned(),
            source,
        })?;
    }
    Ok(extra)
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

/// Makes a marked, owned node at `name` in `dir` and returns it, held by
/// its descriptor. Every step after `mknodat` goes through one `O_PATH`
/// descriptor of the inode, checked first to be the one just made (block
/// device, our rdev, our uid, exactly one link), so a name swapped under us
/// gets nothing chowned, marked or moved.
fn make_node(
    dir: &OwnedFd,
    name: &OsStr,
    shown: &Path,
    rdev: DeviceNumber,
    owner: NodeOwner,
    volume: &VolumeId,
    after_mknod: AfterMknod<'_>,
) -> Result<Existing, JailError> {
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
    after_mknod(dir, name);
    let swapped = |found: String| JailError::Swapped {
        path: shown.to_owned(),
        found,
    };
    let fd = open_inode(dir, name, shown)?.ok_or_else(|| swapped("nothing".to_owned()))?;
    let stat = stat_fd(&fd, shown)?;
    let is_block = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFBLK;
    if !is_block
        || stat.st_rdev != rdev.0
        || stat.st_nlink != 1
        || stat.st_uid != nix::unistd::geteuid().as_raw()
    {
        return Err(swapped(format!(
            "{} {}, {} links, owner uid {}",
            if is_block {
                "block device"
            } else {
                "not a block device:"
            },
            DeviceNumber(stat.st_rdev),
            stat.st_nlink,
            stat.st_uid
        )));
    }
    let node = Existing {
        fd,
        stat,
        is_block,
        rdev,
        mark: Some(volume.as_str().to_owned()),
    };
    let finish = || -> Result<(), JailError> {
        // Marked first: a node that exists is provably ours from here on.
        write_mark(&node.fd, volume, shown)?;
        chown_fd(&node.fd, owner.uid, owner.gid, shown)?;
        // Set explicitly: mknod's mode went through the process umask.
        chmod_fd(&node.fd, NODE_MODE, shown)?;
        let mode = stat_fd(&node.fd, shown)?.st_mode & 0o7777;
        if mode != NODE_MODE {
            return Err(JailError::Mode {
                path: shown.to_owned(),
                mode,
            });
        }
        Ok(())
    };
    match finish() {
        Ok(()) => Ok(node),
        Err(error) => {
            // Do not leave a half-made node behind; it was made just now.
            let _ = remove_ours(dir, name, &node, shown);
            Err(error)
        }
    }
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
        Some(existing) if existing.is_ours(volume) => {
            remove_ours(dir, temp, &existing, shown).map(|_| ())
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
/// * Our node for this volume, stale (other rdev, owner or mode) → the old
///   inode is neutralised (root, mode 0: see [`ExposedNode::extra_links`])
///   and a new node renamed over it → `Created` with
///   [`ExposedNode::replaced`] set.
/// * Anything else (no mark, another volume's mark, not a block device, a
///   symlink) → [`JailError::Foreign`]; nothing is changed.
pub fn expose(
    jail: &JailPath,
    rdev: DeviceNumber,
    owner: NodeOwner,
    volume: &VolumeId,
) -> Result<CreateAction<ExposedNode>, JailError> {
    expose_with(jail, rdev, owner, volume, &|_, _| {})
}

/// A hook that runs right after `mknodat` of the temporary name: tests play
/// a hostile jail owner there.
type AfterMknod<'a> = &'a dyn Fn(&OwnedFd, &OsStr);

fn expose_with(
    jail: &JailPath,
    rdev: DeviceNumber,
    owner: NodeOwner,
    volume: &VolumeId,
    after_mknod: AfterMknod<'_>,
) -> Result<CreateAction<ExposedNode>, JailError> {
    let dir = open_parent(jail)?;
    let (_, name) = jail.split();
    let shown = jail.full();
    let node = |replaced, extra_links| ExposedNode {
        path: shown.clone(),
        rdev,
        owner,
        replaced,
        extra_links,
    };
    let stale = match inspect(&dir, name, &shown)? {
        None => None,
        Some(existing) => {
            if !existing.is_ours(volume) {
                return Err(JailError::Foreign {
                    path: shown,
                    volume: volume.clone(),
                    found: describe(&existing),
                });
            }
            if existing.rdev == rdev
                && existing.stat.st_uid == owner.uid
                && existing.stat.st_gid == owner.gid
                && existing.mode() == NODE_MODE
            {
                return Ok(CreateAction::Identity(node(None, 0)));
            }
            Some(existing)
        }
    };
    let temp = temp_name(name);
    let temp_shown = shown.with_file_name(&temp);
    clear_temp(&dir, &temp, &temp_shown, volume)?;
    let made = make_node(&dir, &temp, &temp_shown, rdev, owner, volume, after_mknod)?;
    let undo = |error: JailError| {
        let _ = remove_ours(&dir, &temp, &made, &temp_shown);
        error
    };
    let extra_links = match &stale {
        Some(old) => neutralise(old, &shown).map_err(undo)?,
        None => 0,
    };
    if !made.still_at(&dir, &temp) {
        return Err(undo(JailError::Swapped {
            path: temp_shown.clone(),
            found: "another inode at the temporary name".to_owned(),
        }));
    }
    let moved = match stale {
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
        return Err(undo(JailError::Rename {
            path: shown,
            source,
        }));
    }
    if !made.still_at(&dir, name) {
        // Swapped between the check and the rename: whatever now sits at
        // the name is not ours; our inode loses all access.
        let _ = neutralise(&made, &temp_shown);
        return Err(JailError::Swapped {
            path: shown,
            found: "another inode moved into place".to_owned(),
        });
    }
    let replaced = stale.as_ref().map(|old| old.rdev);
    if let Some(old) = replaced {
        tracing::info!(node = %shown.display(), %old, new = %rdev, extra_links,
            "replaced stale device node");
    }
    Ok(CreateAction::Created(node(replaced, extra_links)))
}

/// Removes the node at `jail` if, and only if, it is ours for `volume`,
/// after neutralising its inode (root, mode 0), so that any hard link to
/// it is useless too. A missing node (or missing jail directory) is
/// `Identity`.
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
        Some(existing) if existing.is_ours(volume) => {
            let _ = remove_ours(&dir, name, &existing, &shown)?;
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
    use std::os::unix::ffi::OsStrExt;
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
        let len = lgetxattr_for_test(&jail.full(), &mut mark).unwrap();
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

    /// Reproduced: a jail owner who swapped a hard link to another file into
    /// the temporary name got that file chowned to them.
    #[test]
    fn a_hard_link_swapped_into_the_temporary_name_is_never_touched() {
        let dir = jail_dir();
        let outside = dir.path().join("secret");
        fs::write(&outside, b"root only").unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o600)).unwrap();
        let volume = VolumeId::generate();
        let jail = JailPath::new(dir.path(), "dev/vdb").unwrap();
        let swap = |dir: &OwnedFd, temp: &OsStr| {
            unlinkat(dir, temp, UnlinkatFlags::NoRemoveDir).unwrap();
            nix::unistd::linkat(AT_FDCWD, &outside, dir, temp, nix::fcntl::AtFlags::empty())
                .unwrap();
        };
        let err = expose_with(&jail, loop_rdev(3), OWNER, &volume, &swap).unwrap_err();
        assert!(matches!(err, JailError::Swapped { .. }), "{err}");
        let meta = fs::metadata(&outside).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (0, 0),
            "the other file was chowned"
        );
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        let mut mark = [0u8; 64];
        assert!(lgetxattr_for_test(&outside, &mut mark).is_none(), "marked");
        assert!(!jail.full().exists(), "moved into place");
        // The next expose clears the leftover without touching the file.
        assert!(matches!(
            expose(&jail, loop_rdev(3), OWNER, &volume),
            Err(JailError::Foreign { .. })
        ));
        assert_eq!(fs::metadata(&outside).unwrap().uid(), 0);
    }

    /// Reproduced: a link the jail owner made to our node survived a replace
    /// and an unexpose with its old rdev, uid 1000 and mode 0600.
    #[test]
    fn links_to_our_nodes_are_neutralised_before_unlink_or_replace() {
        let dir = jail_dir();
        let volume = VolumeId::generate();
        let jail = JailPath::new(dir.path(), "dev/vdb").unwrap();
        let owner_and_mode = |path: &Path| {
            let meta = fs::symlink_metadata(path).unwrap();
            (meta.uid(), meta.gid(), meta.permissions().mode() & 0o7777)
        };
        let _ = expose(&jail, loop_rdev(3), OWNER, &volume).unwrap();
        let kept = dir.path().join("dev/kept");
        fs::hard_link(jail.full(), &kept).unwrap();
        let replaced = expose(&jail, loop_rdev(9), OWNER, &volume).unwrap();
        assert_eq!(replaced.inner().extra_links, 1);
        assert_eq!(owner_and_mode(&kept), (0, 0, 0), "link kept after replace");
        assert_eq!(
            owner_and_mode(&jail.full()),
            (OWNER.uid, OWNER.gid, NODE_MODE)
        );
        let kept_again = dir.path().join("dev/kept-again");
        fs::hard_link(jail.full(), &kept_again).unwrap();
        assert_eq!(unexpose(&jail, &volume).unwrap(), DeleteAction::Deleted);
        assert_eq!(
            owner_and_mode(&kept_again),
            (0, 0, 0),
            "link kept after unexpose"
        );
        assert!(!jail.full().exists());
    }

    fn lgetxattr_for_test(path: &Path, value: &mut [u8]) -> Option<usize> {
        let path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        let name = std::ffi::CString::new(OWNER_XATTR).unwrap();
        // SAFETY: both strings are NUL-terminated and `value` is writable
        // for its length.
        let len = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        usize::try_from(len).ok()
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

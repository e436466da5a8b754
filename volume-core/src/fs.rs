//! ext4 on a volume's final block device: detect, make (never over data),
//! grow.
//!
//! Detection is libblkid's low-level probe in process (`libblkid-rs`, as
//! stratisd uses it): every superblock and partition-table type libblkid
//! knows, no program, no cache, the answer `blkid -p` gives. It is the guard
//! before `crypt_format` and `mkfs.ext4`: anything it finds, or an
//! ambiguous answer, is refused. Of an ext2/3/4 signature we also read the
//! superblock fields we need (UUID, label, block size and count) ourselves,
//! because libblkid 2.38 does not report the block count.
//!
//! `mkfs.ext4` options, chosen for thin volumes:
//! * `-E lazy_itable_init=1,lazy_journal_init=1`: do not write every inode
//!   table and the whole journal at mkfs time. On a thin LV those writes
//!   would provision pool space for empty metadata and make create take time
//!   proportional to the volume size; the kernel initialises inode tables
//!   in the background after mount, and the journal is safe unzeroed
//!   because jbd2 only replays blocks with its magic and the expected
//!   sequence (over dm-crypt, unwritten blocks decrypt to noise, never to
//!   a valid journal block of this filesystem).
//! * `-E nodiscard`: a fresh thin LV has no provisioned blocks; a discard
//!   pass over it does nothing useful and takes long on large volumes.
//! * `-O ^resize_inode`: no group descriptor blocks reserved for growth.
//!   mke2fs reserves enough for a 1024-fold growth and writes them in every
//!   backup group; that was half of mkfs's time (in the micro-VM, a 25 GiB
//!   thin LV: 530–590 ms with them, 280–310 ms without). Growth does not
//!   need them: `resize2fs` offline moves what is in the way of new
//!   descriptor blocks, and the kernel online converts the filesystem to
//!   `meta_bg` once it needs more (`real_test_extend_grows_the_filesystem_
//!   offline_and_online` crosses a descriptor block both ways and checks
//!   the result with `e2fsck -fn`).
//! * `-b 4096`: the block size must be at least the dm-crypt sector size
//!   (4096); mke2fs would pick 1024 for small volumes, which dm-crypt with
//!   4K sectors cannot serve.
//! * `-U <uuid>` derived from the volume id, and `-L <label>` the 16 random
//!   characters of the id (ext4 labels hold 16 bytes, `vol_` + 16 does not
//!   fit): the UUID is what proves a filesystem is this volume's; the label
//!   is for people reading `blkid`.
//! * No `-F`: our own check refuses existing signatures first, and mke2fs's
//!   "proceed anyway?" question, asked with stdin at `/dev/null`, is a second
//!   refusal.
//!
//! Growing: `resize2fs` online when the filesystem is mounted on this host;
//! otherwise `e2fsck -f -p` first (resize2fs demands a freshly checked
//! filesystem; `-p` repairs only what is safe without a human and fails on
//! anything else, where `-y` would answer yes to every destructive fix) and
//! then `resize2fs` offline. A filesystem mounted inside a guest is not
//! mounted here, so callers must not grow a volume a VM has open (see
//! [`crate::host`]).
//!
//! **Never checks or resizes a filesystem something has open.** Before
//! `e2fsck` and again before `resize2fs`, [`holders`] asks the kernel: the
//! device-mapper open count of the device (and of the LV beneath a
//! mapping, which the mapping itself holds once), and whether an exclusive
//! open (`O_EXCL`) is refused because of a mount anywhere, in any mount
//! namespace, or another exclusive claim. Anything found leaves the growth
//! to whoever holds it ([`GrowOutcome::InUse`]). The check cannot be held
//! across the programs (`e2fsck` and `resize2fs` open the device with
//! `O_EXCL` themselves, which also keeps mounts out while each runs); a
//! plain open that starts in between is the caller's to prevent, which is
//! why the host runs extend under the volume's lock.

use crate::actions::{CreateAction, ExtendAction};
use crate::cmd::{CmdError, Tools};
use crate::names::VolumeId;
use crate::units::Bytes;
use devicemapper::{DevId, DM};
use libblkid_rs::{BlkidProbe, BlkidSafeprobeRet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Namespace for UUIDs derived from volume ids (UUIDv5), fixed forever.
const VOLUME_UUID_NAMESPACE: Uuid = Uuid::from_u128(0x5d6a_4f0e_8c1b_4b7e_9a3d_2f61_c0de_0001);

/// What a derived UUID names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UuidPurpose {
    Filesystem,
    LuksHeader,
}

/// A deterministic UUID for `id`: the same volume always gets the same one,
/// so a re-run after a crash recognises what it made.
pub fn volume_uuid(purpose: UuidPurpose, id: &VolumeId) -> Uuid {
    let tag = match purpose {
        UuidPurpose::Filesystem => "ext4",
        UuidPurpose::LuksHeader => "luks2",
    };
    Uuid::new_v5(&VOLUME_UUID_NAMESPACE, format!("{tag}:{id}").as_bytes())
}

/// The ext4 label of `id`: its 16 random characters.
pub fn volume_label(id: &VolumeId) -> &str {
    id.as_str().strip_prefix("vol_").unwrap_or(id.as_str())
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("could not read {device}: {source}")]
    Read {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not probe {device} for signatures: {reason}")]
    Probe { device: PathBuf, reason: String },
    #[error("{device} already holds {found}; refusing to make a filesystem over it")]
    Occupied { device: PathBuf, found: String },
    #[error("tune2fs on {device} finished but the device does not show the new UUID and label ({found})")]
    NotAdopted { device: PathBuf, found: String },
    #[error("{device} holds no ext4 filesystem ({found})")]
    NotExt4 { device: PathBuf, found: String },
    #[error(
        "mkfs.ext4 on {device} finished but the device does not show our filesystem ({found})"
    )]
    NotMade { device: PathBuf, found: String },
    #[error("could not read {path}: {source}")]
    MountInfo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not tell whether {device} is in use: {reason}")]
    Holders { device: PathBuf, reason: String },
    #[error("{device} is in use ({holders}); refusing to check its filesystem")]
    Busy { device: PathBuf, holders: Holders },
    #[error(transparent)]
    Command(#[from] CmdError),
}

/// What holds a block device open beyond what is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Holders {
    /// Device-mapper opens beyond the expected ones (a VM, a `dd`, ...).
    pub extra_opens: u32,
    /// An exclusive open was refused: mounted (perhaps in another mount
    /// namespace) or claimed by another exclusive opener.
    pub exclusive: bool,
}

impl Holders {
    pub fn any(&self) -> bool {
        self.extra_opens > 0 || self.exclusive
    }
}

impl std::fmt::Display for Holders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.extra_opens, self.exclusive) {
            (0, false) => f.write_str("nothing holds it"),
            (n, false) => write!(f, "open {n} more time(s) than this host's own stack"),
            (0, true) => f.write_str("claimed exclusively (mounted, perhaps in another namespace)"),
            (n, true) => write!(
                f,
                "open {n} more time(s) and claimed exclusively (mounted, perhaps in another namespace)"
            ),
        }
    }
}

/// The open count of the device-mapper device `rdev`, or `None` when it is
/// not a device-mapper device (or this kernel has no device-mapper).
fn dm_open_count(device: &Path, rdev: u64) -> Result<Option<u32>, FsError> {
    let fail = |reason: String| FsError::Holders {
        device: device.to_owned(),
        reason,
    };
    if !Path::new("/dev/mapper/control").exists() {
        return Ok(None);
    }
    let dm = DM::new().map_err(|e| fail(e.to_string()))?;
    let wanted = devicemapper::Device::from(rdev);
    let Some((name, _, _)) = dm
        .list_devices()
        .map_err(|e| fail(e.to_string()))?
        .into_iter()
        .find(|(_, dev, _)| *dev == wanted)
    else {
        return Ok(None);
    };
    let info = dm
        .device_info(&DevId::Name(&name))
        .map_err(|e| fail(e.to_string()))?;
    Ok(Some(u32::try_from(info.open_count()).unwrap_or(0)))
}

/// Who holds `device` beyond `expected_opens` device-mapper opens (0 for a
/// volume's final device; 1 for the LV under a dm-crypt mapping). A regular
/// file has no holders.
pub fn holders(device: &Path, expected_opens: u32) -> Result<Holders, FsError> {
    let meta = std::fs::metadata(device).map_err(|source| FsError::Read {
        device: device.to_owned(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Ok(Holders::default());
    }
    // Counted before our own probe below opens it.
    let opens = dm_open_count(device, meta.rdev())?.unwrap_or(0);
    let exclusive = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(device)
    {
        Ok(_probe) => false,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => true,
        Err(source) => {
            return Err(FsError::Read {
                device: device.to_owned(),
                source,
            })
        }
    };
    Ok(Holders {
        extra_opens: opens.saturating_sub(expected_opens),
        exclusive,
    })
}

/// What [`grow_ext4`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrowOutcome {
    Grown(ExtendAction),
    /// Something holds the device (or the LV beneath it) open; nothing was
    /// checked or resized.
    InUse(Holders),
}

/// The fields of an ext2/3/4 superblock we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtSuperblock {
    pub uuid: Uuid,
    pub label: String,
    pub block_size: u64,
    pub blocks: u64,
    /// `metadata_csum`: every metadata block's checksum is seeded from the
    /// UUID (unless `metadata_csum_seed` keeps the seed apart).
    pub metadata_csum: bool,
}

impl ExtSuperblock {
    pub fn size(&self) -> Bytes {
        Bytes(self.blocks.saturating_mul(self.block_size))
    }
}

/// What the start of a device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// No signature we know: a fresh thin LV (zeros) or a fresh dm-crypt
    /// mapping (noise).
    Nothing,
    Ext(ExtSuperblock),
    Luks,
    Xfs,
    Btrfs,
    Swap,
    PartitionTable,
    /// Any other signature libblkid knows (its `TYPE`), or more than one.
    Other(String),
}

impl std::fmt::Display for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signature::Nothing => f.write_str("no known signature"),
            Signature::Ext(sb) => write!(
                f,
                "an ext2/3/4 filesystem (UUID {}, label {:?}, {})",
                sb.uuid,
                sb.label,
                sb.size()
            ),
            Signature::Luks => f.write_str("a LUKS header"),
            Signature::Xfs => f.write_str("an XFS filesystem"),
            Signature::Btrfs => f.write_str("a btrfs filesystem"),
            Signature::Swap => f.write_str("a swap area"),
            Signature::PartitionTable => f.write_str("a partition table"),
            Signature::Other(what) => write!(f, "{what}"),
        }
    }
}

const EXT_SUPERBLOCK: u64 = 1024;
const EXT_MAGIC: u16 = 0xEF53;
const EXT_INCOMPAT_64BIT: u32 = 0x80;
const EXT_RO_COMPAT_METADATA_CSUM: u32 = 0x400;

fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// Reads the signatures on `device` (a block device or file) with libblkid.
pub fn probe(device: &Path) -> Result<Signature, FsError> {
    let fail = |reason: String| FsError::Probe {
        device: device.to_owned(),
        reason,
    };
    // libblkid opens the path itself; check first that it can be read, so
    // a missing device is a plain read error.
    File::open(device).map_err(|source| FsError::Read {
        device: device.to_owned(),
        source,
    })?;
    let mut blkid = BlkidProbe::new_from_filename(device).map_err(|e| fail(e.to_string()))?;
    blkid
        .enable_superblocks(true)
        .and_then(|()| blkid.enable_partitions(true))
        .map_err(|e| fail(e.to_string()))?;
    match blkid.do_safeprobe().map_err(|e| fail(e.to_string()))? {
        BlkidSafeprobeRet::None => return Ok(Signature::Nothing),
        BlkidSafeprobeRet::Ambiguous => {
            return Ok(Signature::Other(
                "more than one signature (libblkid calls it ambiguous)".to_owned(),
            ))
        }
        BlkidSafeprobeRet::Success => {}
    }
    let value = |name: &str| blkid.lookup_value(name).ok();
    let signature = match value("TYPE").as_deref() {
        Some("ext2" | "ext3" | "ext4" | "ext4dev") => match read_ext_superblock(device)? {
            Some(sb) => Signature::Ext(sb),
            None => Signature::Other("an ext2/3/4 signature without a readable superblock".into()),
        },
        Some("crypto_LUKS") => Signature::Luks,
        Some("xfs") => Signature::Xfs,
        Some("btrfs") => Signature::Btrfs,
        Some("swap" | "swsuspend") => Signature::Swap,
        Some(other) => Signature::Other(format!("a {other} signature")),
        None if value("PTTYPE").is_some() => Signature::PartitionTable,
        None => Signature::Other("a signature of unknown type".to_owned()),
    };
    Ok(signature)
}

/// The ext2/3/4 superblock at byte 1024 of `device`, if its magic is there.
fn read_ext_superblock(device: &Path) -> Result<Option<ExtSuperblock>, FsError> {
    let read_err = |source| FsError::Read {
        device: device.to_owned(),
        source,
    };
    let mut file = File::open(device).map_err(read_err)?;
    file.seek(SeekFrom::Start(EXT_SUPERBLOCK))
        .map_err(read_err)?;
    let mut sb = vec![0u8; 1024];
    match file.read_exact(&mut sb) {
        Ok(()) => Ok(parse_ext_superblock(&sb)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(read_err(e)),
    }
}

/// The fields we use of a 1024-byte ext2/3/4 superblock.
pub fn parse_ext_superblock(sb: &[u8]) -> Option<ExtSuperblock> {
    if sb.len() < 1024 || le16(sb, 0x38) != EXT_MAGIC {
        return None;
    }
    let log_block = le32(sb, 0x18).min(16);
    let incompat = le32(sb, 0x60);
    let blocks_hi = if incompat & EXT_INCOMPAT_64BIT != 0 {
        u64::from(le32(sb, 0x150))
    } else {
        0
    };
    let label = &sb[0x78..0x88];
    let label_len = label.iter().position(|b| *b == 0).unwrap_or(label.len());
    Some(ExtSuperblock {
        metadata_csum: le32(sb, 0x64) & EXT_RO_COMPAT_METADATA_CSUM != 0,
        uuid: Uuid::from_bytes(sb[0x68..0x78].try_into().expect("16 bytes")),
        label: String::from_utf8_lossy(&label[..label_len]).into_owned(),
        block_size: 1024u64 << log_block,
        blocks: (blocks_hi << 32) | u64::from(le32(sb, 0x04)),
    })
}

/// The arguments of `mkfs.ext4` for `id` on `device` (see the module docs).
pub fn mkfs_args(device: &Path, id: &VolumeId) -> Vec<std::ffi::OsString> {
    let uuid = volume_uuid(UuidPurpose::Filesystem, id).to_string();
    [
        "-q",
        "-t",
        "ext4",
        "-b",
        "4096",
        "-U",
        &uuid,
        "-L",
        volume_label(id),
        "-O",
        "^resize_inode",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
    ]
    .iter()
    .map(Into::into)
    .chain(std::iter::once(device.as_os_str().to_owned()))
    .collect()
}

/// Makes this volume's ext4 filesystem on `device` unless it is already
/// there. Any other signature, including another ext4 filesystem, is
/// refused: this never formats over data.
pub fn make_ext4(
    tools: &Tools,
    device: &Path,
    id: &VolumeId,
) -> Result<CreateAction<ExtSuperblock>, FsError> {
    let ours = volume_uuid(UuidPurpose::Filesystem, id);
    match probe(device)? {
        Signature::Ext(sb) if sb.uuid == ours => return Ok(CreateAction::Identity(sb)),
        Signature::Nothing => {}
        found => {
            return Err(FsError::Occupied {
                device: device.to_owned(),
                found: found.to_string(),
            })
        }
    }
    tools.mkfs_ext4.run(mkfs_args(device, id), &[0])?;
    // What mkfs made is checked by its superblock alone: the full probe
    // above already ruled out everything else, and costs a libblkid pass.
    match read_ext_superblock(device)? {
        Some(sb) if sb.uuid == ours => Ok(CreateAction::Created(sb)),
        Some(sb) => Err(FsError::NotMade {
            device: device.to_owned(),
            found: format!("an ext2/3/4 filesystem with UUID {}", sb.uuid),
        }),
        None => Err(FsError::NotMade {
            device: device.to_owned(),
            found: "no ext2/3/4 superblock".to_owned(),
        }),
    }
}

/// The size of a block device or file in bytes.
pub fn device_size(device: &Path) -> Result<Bytes, FsError> {
    let mut file = File::open(device).map_err(|source| FsError::Read {
        device: device.to_owned(),
        source,
    })?;
    // Seeking to the end gives the size of block devices and files alike.
    file.seek(SeekFrom::End(0))
        .map(Bytes)
        .map_err(|source| FsError::Read {
            device: device.to_owned(),
            source,
        })
}

/// Whether the block device `device` is mounted according to `mountinfo`
/// (normally `/proc/self/mountinfo`; a parameter so tests can point it at a
/// file). Regular files are never mounted.
pub fn is_mounted(device: &Path, mountinfo: &Path) -> Result<bool, FsError> {
    let meta = std::fs::metadata(device).map_err(|source| FsError::Read {
        device: device.to_owned(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Ok(false);
    }
    let rdev = meta.rdev();
    let wanted = format!(
        "{}:{}",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    let text = std::fs::read_to_string(mountinfo).map_err(|source| FsError::MountInfo {
        path: mountinfo.to_owned(),
        source,
    })?;
    Ok(text
        .lines()
        .any(|line| line.split_whitespace().nth(2) == Some(wanted.as_str())))
}

/// Checks the ext4 filesystem on a `device` that nothing else uses (a
/// volume just restored from a snapshot): `e2fsck -f -p` replays the
/// journal of a crash-consistent copy and fixes what a crash safely leaves
/// (orphan inodes, free counts), so the copy then checks clean with
/// `e2fsck -fn`. Anything that needs a person is an error.
pub fn check_ext4(tools: &Tools, device: &Path) -> Result<(), FsError> {
    match probe(device)? {
        Signature::Ext(_) => {}
        found => {
            return Err(FsError::NotExt4 {
                device: device.to_owned(),
                found: found.to_string(),
            })
        }
    }
    // The mapping was opened by this restore a moment ago and nothing else
    // knows the volume yet, but an opener was seen there once (the demo, in
    // the micro-VM) and was gone at once: give a transient one 2 s.
    let mut found = holders(device, 0)?;
    for _ in 0..20 {
        if !found.any() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        found = holders(device, 0)?;
    }
    if found.any() {
        return Err(FsError::Busy {
            device: device.to_owned(),
            holders: found,
        });
    }
    // 0: clean, 1: errors fixed safely; anything else needs a person.
    tools.e2fsck.run(
        [
            std::ffi::OsStr::new("-f"),
            "-p".as_ref(),
            device.as_os_str(),
        ],
        &[0, 1],
    )?;
    Ok(())
}

/// Makes the ext4 filesystem on `device`, a restored or forked copy of
/// another volume's, volume `id`'s own: its UUID and label. `Identity` if
/// they are already. Two filesystems with one UUID in one VM would make
/// mount-by-UUID pick either, and our own check of which filesystem is
/// whose ([`make_ext4`]) reads the UUID.
///
/// Called after [`check_ext4`] (the journal replayed: `tune2fs` refuses a
/// filesystem that needs recovery) and only while nothing holds `device`.
/// With `metadata_csum`, a plain `tune2fs -U` rewrites the checksum of
/// every metadata block, and a crash in the middle leaves a filesystem
/// with checksums of two UUIDs. So it first turns on `metadata_csum_seed`
/// (Linux 4.4, e2fsprogs 1.43): the current seed is kept in the
/// superblock, and the UUID change then writes the superblocks and
/// nothing else. A crash before the new UUID is seen re-runs the same
/// command, which is idempotent.
pub fn adopt_ext4(
    tools: &Tools,
    device: &Path,
    id: &VolumeId,
) -> Result<CreateAction<ExtSuperblock>, FsError> {
    let ours = volume_uuid(UuidPurpose::Filesystem, id);
    let label = volume_label(id);
    let before = match probe(device)? {
        Signature::Ext(sb) => sb,
        found => {
            return Err(FsError::NotExt4 {
                device: device.to_owned(),
                found: found.to_string(),
            })
        }
    };
    if before.uuid == ours && before.label == label {
        return Ok(CreateAction::Identity(before));
    }
    let found = holders(device, 0)?;
    if found.any() {
        return Err(FsError::Busy {
            device: device.to_owned(),
            holders: found,
        });
    }
    tools.tune2fs.run(adopt_args(device, id, &before), &[0])?;
    match probe(device)? {
        Signature::Ext(sb) if sb.uuid == ours && sb.label == label => Ok(CreateAction::Created(sb)),
        found => Err(FsError::NotAdopted {
            device: device.to_owned(),
            found: found.to_string(),
        }),
    }
}

/// The arguments of `tune2fs` for [`adopt_ext4`].
pub fn adopt_args(device: &Path, id: &VolumeId, sb: &ExtSuperblock) -> Vec<std::ffi::OsString> {
    let uuid = volume_uuid(UuidPurpose::Filesystem, id).to_string();
    let seed: &[&str] = if sb.metadata_csum {
        &["-O", "metadata_csum_seed"]
    } else {
        &[]
    };
    seed.iter()
        .copied()
        .chain(["-U", &uuid, "-L", volume_label(id)])
        .map(Into::into)
        .chain(std::iter::once(device.as_os_str().to_owned()))
        .collect()
}

/// Grows the ext4 filesystem on `device` to fill it; `Identity` if it
/// already does. Online when mounted on this host, offline otherwise (see
/// the module docs for why `e2fsck -f -p`), and then only while nothing
/// holds `device` or `lower` (the LV under a mapping) open.
pub fn grow_ext4(
    tools: &Tools,
    device: &Path,
    lower: Option<&Path>,
    mountinfo: &Path,
) -> Result<GrowOutcome, FsError> {
    let before = match probe(device)? {
        Signature::Ext(sb) => sb,
        found => {
            return Err(FsError::NotExt4 {
                device: device.to_owned(),
                found: found.to_string(),
            })
        }
    };
    let available = device_size(device)?.0 / before.block_size;
    if before.blocks >= available {
        return Ok(GrowOutcome::Grown(ExtendAction::Identity(before.size())));
    }
    let held = || -> Result<Option<Holders>, FsError> {
        let mut found = holders(device, 0)?;
        if let Some(lower) = lower {
            // The mapping holds the LV once and claims it exclusively, so
            // only further opens count there.
            found.extra_opens += holders(lower, 1)?.extra_opens;
        }
        Ok(found.any().then_some(found))
    };
    if is_mounted(device, mountinfo)? {
        tools.resize2fs.run([device.as_os_str()], &[0])?;
    } else {
        if let Some(found) = held()? {
            return Ok(GrowOutcome::InUse(found));
        }
        // 0: clean, 1: errors fixed safely; anything else needs a person.
        tools.e2fsck.run(
            [
                std::ffi::OsStr::new("-f"),
                "-p".as_ref(),
                device.as_os_str(),
            ],
            &[0, 1],
        )?;
        if let Some(found) = held()? {
            return Ok(GrowOutcome::InUse(found));
        }
        tools.resize2fs.run([device.as_os_str()], &[0])?;
    }
    let after = match probe(device)? {
        Signature::Ext(sb) => sb,
        found => {
            return Err(FsError::NotExt4 {
                device: device.to_owned(),
                found: found.to_string(),
            })
        }
    };
    Ok(GrowOutcome::Grown(ExtendAction::Extended {
        from: before.size(),
        to: after.size(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::MIB;
    use std::os::unix::fs::FileExt;

    fn tools() -> Tools {
        Tools::locate().expect("e2fsprogs installed on the test host")
    }

    fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
        let path = dir.join(name);
        File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    #[test]
    fn derived_uuids_are_stable_distinct_and_per_purpose() {
        let id = VolumeId::new("vol_0123456789abcdef").unwrap();
        let fs_uuid = volume_uuid(UuidPurpose::Filesystem, &id);
        assert_eq!(fs_uuid, volume_uuid(UuidPurpose::Filesystem, &id));
        assert_ne!(fs_uuid, volume_uuid(UuidPurpose::LuksHeader, &id));
        assert_ne!(
            fs_uuid,
            volume_uuid(
                UuidPurpose::Filesystem,
                &VolumeId::new("vol_0123456789abcdee").unwrap()
            )
        );
        assert_eq!(fs_uuid.get_version_num(), 5);
        assert_eq!(volume_label(&id), "0123456789abcdef");
        assert!(volume_label(&id).len() <= 16);
    }

    #[test]
    fn mkfs_options_are_the_documented_ones() {
        let id = VolumeId::new("vol_0123456789abcdef").unwrap();
        let args: Vec<String> = mkfs_args(Path::new("/dev/mapper/x"), &id)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let uuid = volume_uuid(UuidPurpose::Filesystem, &id).to_string();
        assert_eq!(
            args,
            [
                "-q",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-U",
                uuid.as_str(),
                "-L",
                "0123456789abcdef",
                "-O",
                "^resize_inode",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                "/dev/mapper/x"
            ]
        );
        assert!(!args.contains(&"-F".to_owned()));
    }

    /// Runs a tool the test needs (not production code: `cmd` is for that).
    fn run(program: &str, args: &[&str], input: &str) {
        use std::io::Write;
        let mut child = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e} (scripts/setup installs it)"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "{program} {args:?}");
    }

    #[test]
    fn signatures_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        let blank = sparse_file(dir.path(), "blank.img", 8 * MIB);
        assert_eq!(probe(&blank).unwrap(), Signature::Nothing);
        let luks = sparse_file(dir.path(), "luks.img", 8 * MIB);
        File::options()
            .write(true)
            .open(&luks)
            .unwrap()
            .write_all_at(b"LUKS\xba\xbe\x00\x02", 0)
            .unwrap();
        assert_eq!(probe(&luks).unwrap(), Signature::Luks);
        let xfs = sparse_file(dir.path(), "xfs.img", 320 * MIB);
        run("mkfs.xfs", &["-q", &path("xfs.img")], "");
        assert_eq!(probe(&xfs).unwrap(), Signature::Xfs);
        let btrfs = sparse_file(dir.path(), "btrfs.img", 320 * MIB);
        run("mkfs.btrfs", &["-q", &path("btrfs.img")], "");
        assert_eq!(probe(&btrfs).unwrap(), Signature::Btrfs);
        let swap = sparse_file(dir.path(), "swap.img", 8 * MIB);
        run("mkswap", &["-q", &path("swap.img")], "");
        assert_eq!(probe(&swap).unwrap(), Signature::Swap);
        for label in ["dos", "gpt"] {
            let table = sparse_file(dir.path(), label, 8 * MIB);
            run(
                "sfdisk",
                &["-q", &path(label)],
                &format!("label: {label}\nstart=2048, size=4096\n"),
            );
            assert_eq!(probe(&table).unwrap(), Signature::PartitionTable, "{label}");
        }
        // Anything else libblkid knows is named: an external ext4 journal.
        let journal = sparse_file(dir.path(), "journal.img", 8 * MIB);
        run(
            "mke2fs",
            &[
                "-q",
                "-O",
                "journal_dev",
                "-b",
                "4096",
                &path("journal.img"),
            ],
            "",
        );
        match probe(&journal).unwrap() {
            Signature::Other(what) => assert!(what.contains("jbd"), "{what}"),
            other => panic!("expected the journal's signature, got {other}"),
        }
        // Short devices are probed as far as they go.
        let short = sparse_file(dir.path(), "short.img", 100);
        assert_eq!(probe(&short).unwrap(), Signature::Nothing);
    }

    #[test]
    fn make_detect_and_refuse_to_reformat() {
        let dir = tempfile::tempdir().unwrap();
        let device = sparse_file(dir.path(), "vol.img", 64 * MIB);
        let id = VolumeId::generate();
        let made = make_ext4(&tools(), &device, &id).unwrap();
        assert!(made.changed());
        let sb = made.into_inner();
        assert_eq!(sb.uuid, volume_uuid(UuidPurpose::Filesystem, &id));
        assert_eq!(sb.label, volume_label(&id));
        assert_eq!(sb.block_size, 4096);
        assert_eq!(sb.size(), Bytes(64 * MIB));
        // A second run changes no byte of the device.
        let before = std::fs::read(&device).unwrap();
        let again = make_ext4(&tools(), &device, &id).unwrap();
        assert!(!again.changed());
        assert_eq!(std::fs::read(&device).unwrap(), before);
        // Another volume's filesystem is refused, and left byte-for-byte.
        let err = make_ext4(&tools(), &device, &VolumeId::generate()).unwrap_err();
        assert!(matches!(err, FsError::Occupied { .. }), "{err}");
        assert!(err.to_string().contains(&sb.uuid.to_string()), "{err}");
        assert_eq!(std::fs::read(&device).unwrap(), before);
    }

    #[test]
    fn adopt_gives_a_copy_its_own_uuid_and_label_writing_only_superblocks() {
        let dir = tempfile::tempdir().unwrap();
        let tools = tools();
        // Two block groups of 32768 4K blocks: a backup superblock in the
        // second one.
        let origin_image = sparse_file(dir.path(), "origin.img", 256 * MIB);
        let origin = VolumeId::generate();
        let made = make_ext4(&tools, &origin_image, &origin)
            .unwrap()
            .into_inner();
        assert!(made.metadata_csum, "Debian's mke2fs default");
        // A restore's copy: the same bytes.
        let copy = dir.path().join("copy.img");
        std::fs::copy(&origin_image, &copy).unwrap();
        let id = VolumeId::generate();
        let adopted = adopt_ext4(&tools, &copy, &id).unwrap();
        assert!(adopted.changed());
        let sb = adopted.into_inner();
        assert_eq!(sb.uuid, volume_uuid(UuidPurpose::Filesystem, &id));
        assert_eq!(sb.label, volume_label(&id));
        assert_eq!(sb.size(), made.size());
        tools
            .e2fsck
            .run(["-fn".as_ref(), copy.as_os_str()], &[0])
            .expect("the adopted copy checks clean");
        // No checksum was rewritten: only superblocks (at the start of a
        // block group) differ from the origin's bytes.
        let (before, after) = (
            std::fs::read(&origin_image).unwrap(),
            std::fs::read(&copy).unwrap(),
        );
        let changed: Vec<usize> = (0..before.len() / 4096)
            .filter(|b| before[b * 4096..(b + 1) * 4096] != after[b * 4096..(b + 1) * 4096])
            .collect();
        assert!(
            !changed.is_empty() && changed.iter().all(|b| b % 32768 == 0),
            "blocks changed: {changed:?}"
        );
        // Again: nothing to do, no byte written.
        assert!(!adopt_ext4(&tools, &copy, &id).unwrap().changed());
        assert_eq!(std::fs::read(&copy).unwrap(), after);
        // The origin's own filesystem is still the origin's.
        assert!(!make_ext4(&tools, &origin_image, &origin).unwrap().changed());

        // Without metadata_csum there is no seed to keep.
        let plain = sparse_file(dir.path(), "plain.img", 64 * MIB);
        tools
            .mkfs_ext4
            .run(
                ["-q", "-O", "^metadata_csum", "-b", "4096"]
                    .iter()
                    .map(std::ffi::OsStr::new)
                    .chain([plain.as_os_str()]),
                &[0],
            )
            .unwrap();
        let sb = adopt_ext4(&tools, &plain, &id).unwrap().into_inner();
        assert!(!sb.metadata_csum);
        assert_eq!(sb.uuid, volume_uuid(UuidPurpose::Filesystem, &id));
        assert!(!adopt_args(&plain, &id, &sb)
            .iter()
            .any(|a| a == "metadata_csum_seed"));
        // Not an ext4: refused, nothing written.
        let empty = sparse_file(dir.path(), "empty.img", 8 * MIB);
        let err = adopt_ext4(&tools, &empty, &id).unwrap_err();
        assert!(matches!(err, FsError::NotExt4 { .. }), "{err}");
    }

    #[test]
    fn any_other_signature_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let device = sparse_file(dir.path(), "luks.img", 8 * MIB);
        std::fs::write(&device, b"LUKS\xba\xbe\x00\x02").unwrap();
        File::options()
            .write(true)
            .open(&device)
            .unwrap()
            .set_len(8 * MIB)
            .unwrap();
        let err = make_ext4(&tools(), &device, &VolumeId::generate()).unwrap_err();
        assert!(err.to_string().contains("a LUKS header"), "{err}");
        assert_eq!(&std::fs::read(&device).unwrap()[..6], b"LUKS\xba\xbe");
    }

    #[test]
    fn grow_fills_the_device_offline_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let device = sparse_file(dir.path(), "vol.img", 64 * MIB);
        let id = VolumeId::generate();
        let tools = tools();
        let _ = make_ext4(&tools, &device, &id).unwrap();
        let mountinfo = dir.path().join("mountinfo");
        std::fs::write(&mountinfo, "").unwrap();
        assert_eq!(
            grow_ext4(&tools, &device, None, &mountinfo).unwrap(),
            GrowOutcome::Grown(ExtendAction::Identity(Bytes(64 * MIB)))
        );
        File::options()
            .write(true)
            .open(&device)
            .unwrap()
            .set_len(96 * MIB)
            .unwrap();
        assert_eq!(
            grow_ext4(&tools, &device, None, &mountinfo).unwrap(),
            GrowOutcome::Grown(ExtendAction::Extended {
                from: Bytes(64 * MIB),
                to: Bytes(96 * MIB)
            })
        );
        assert!(matches!(
            grow_ext4(&tools, &device, None, &mountinfo).unwrap(),
            GrowOutcome::Grown(ExtendAction::Identity(_))
        ));
        // Growing a device with no filesystem is an error, not a mkfs.
        let blank = sparse_file(dir.path(), "blank.img", 8 * MIB);
        assert!(matches!(
            grow_ext4(&tools, &blank, None, &mountinfo),
            Err(FsError::NotExt4 { .. })
        ));
    }

    #[test]
    fn mount_detection_reads_major_minor_from_mountinfo() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("blk");
        nix::sys::stat::mknod(
            &node,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            nix::sys::stat::makedev(253, 7),
        )
        .unwrap();
        let mountinfo = dir.path().join("mountinfo");
        std::fs::write(
            &mountinfo,
            "22 1 253:17 / /other rw - ext4 /dev/dm-17 rw\n\
             36 35 253:7 / /mnt rw,noatime shared:1 - ext4 /dev/mapper/x rw\n",
        )
        .unwrap();
        assert!(is_mounted(&node, &mountinfo).unwrap());
        std::fs::write(&mountinfo, "22 1 253:17 / /other rw - ext4 /dev/dm-17 rw\n").unwrap();
        assert!(!is_mounted(&node, &mountinfo).unwrap());
        let file = sparse_file(dir.path(), "f", 4096);
        assert!(!is_mounted(&file, &mountinfo).unwrap());
    }
}

//! In-memory LUKS2 headers, mappings and filesystems with the same rules
//! as the real ones (never format over a signature, wrong key refused, a
//! mapping is identity only on its own device), for fast tests of
//! [`super::VolumeHost`]. It reads LV sizes from the backend it sits on.

use super::devices::VolumeDevices;
use crate::actions::{CreateAction, DeleteAction, ExtendAction};
use crate::backend::ThinBackend;
use crate::crypt::{CryptError, FormatGuard};
use crate::fs::{FsError, GrowOutcome};
use crate::jail::{DeviceNumber, JailError};
use crate::keys::VolumeKey;
use crate::names::{DmName, LvName, SnapshotId, VolumeId};
use crate::units::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Header area the simulated LUKS2 format reserves (as the real one does).
const SIM_HEADER: Bytes = Bytes(2 << 20);
const SIM_MAPPER_DIR: &str = "/dev/mapper";
const DM_MAJOR: u64 = 253;

#[derive(Debug)]
struct SimHeader {
    owner: VolumeId,
    key: VolumeKey,
    /// The filesystem inside the encrypted device.
    fs: Option<SimFs>,
}

/// A snapshot copies the header block for block, key slot included.
impl Clone for SimHeader {
    fn clone(&self) -> SimHeader {
        SimHeader {
            owner: self.owner.clone(),
            key: VolumeKey::from_bytes(self.key.expose_secret()).expect("64 bytes"),
            fs: self.fs.clone(),
        }
    }
}

#[derive(Debug, Clone)]
struct SimFs {
    owner: VolumeId,
    size: Bytes,
}

#[derive(Debug)]
struct SimMapping {
    backing: PathBuf,
    rdev: DeviceNumber,
}

/// What an LV device holds.
#[derive(Debug, Default, Clone)]
struct SimLv {
    header: Option<SimHeader>,
    plain_fs: Option<SimFs>,
    /// Foreign bytes planted by a test (e.g. "an ext4 filesystem").
    foreign: Option<String>,
}

/// Counts per volume, so tests can assert nothing was formatted twice.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimCounts {
    pub crypt_formats: u32,
    pub mkfs_runs: u32,
    pub opens: u32,
    pub fs_grows: u32,
}

#[derive(Debug, Default)]
struct SimState {
    lvs: HashMap<PathBuf, SimLv>,
    mappings: BTreeMap<DmName, SimMapping>,
    lv_numbers: HashMap<PathBuf, DeviceNumber>,
    next_minor: u64,
    counts: HashMap<VolumeId, SimCounts>,
    busy: Vec<DmName>,
    /// Queries of device-mapper state (a status or a listing), as the real
    /// devices would make them.
    dm_queries: u64,
}

/// Simulated devices over a (usually simulated) backend.
pub struct SimDevices {
    backend: Arc<dyn ThinBackend>,
    state: Mutex<SimState>,
}

impl std::fmt::Debug for SimDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDevices").finish_non_exhaustive()
    }
}

impl SimDevices {
    pub fn new(backend: Arc<dyn ThinBackend>) -> SimDevices {
        SimDevices {
            backend,
            state: Mutex::new(SimState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many device-mapper queries (one mapping's status, or a listing
    /// of all) the host has made so far.
    pub fn dm_queries(&self) -> u64 {
        self.lock().dm_queries
    }

    pub fn counts(&self, id: &VolumeId) -> SimCounts {
        self.lock().counts.get(id).copied().unwrap_or_default()
    }

    /// Names of open mappings.
    pub fn mappings(&self) -> Vec<DmName> {
        self.lock().mappings.keys().cloned().collect()
    }

    /// LV devices holding any header or filesystem. A removed snapshot's
    /// content is gone with its LV: snapshots are read-only and never
    /// erased (their data is under their volume's key).
    pub fn devices_with_content(&self) -> Vec<PathBuf> {
        let vg = &self.backend.spec().vg;
        let live: Vec<PathBuf> = self
            .backend
            .list_thins()
            .map(|lvs| {
                lvs.into_iter()
                    .map(|v| PathBuf::from(format!("/dev/{vg}/{}", v.lv)))
                    .collect()
            })
            .unwrap_or_default();
        let removed_snapshot = |path: &Path| {
            let snapshot = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| LvName::new(n).ok())
                .and_then(|lv| SnapshotId::from_lv_name(&lv));
            snapshot.is_some() && !live.iter().any(|l| l == path)
        };
        self.lock()
            .lvs
            .iter()
            .filter(|(_, lv)| lv.header.is_some() || lv.plain_fs.is_some() || lv.foreign.is_some())
            .filter(|(path, _)| !removed_snapshot(path))
            .map(|(path, _)| path.clone())
            .collect()
    }

    /// Plants foreign content on an LV device, as another tool would.
    pub fn plant_foreign(&self, lv_device: &Path, what: &str) {
        self.lock()
            .lvs
            .entry(lv_device.to_owned())
            .or_default()
            .foreign = Some(what.to_owned());
    }

    /// Marks a mapping as held open (by a VM or a mount) or releases it.
    pub fn set_busy(&self, id: &VolumeId, busy: bool) {
        let mut state = self.lock();
        state.busy.retain(|name| *name != id.crypt_name());
        if busy {
            state.busy.push(id.crypt_name());
        }
    }

    /// The size of the active LV at `lv_device` (`/dev/<vg>/<lv>`), as a
    /// block device's size query would say: from the thin device, not from
    /// an LVM report.
    fn lv_size(&self, lv_device: &Path) -> Option<Bytes> {
        let name = LvName::new(lv_device.file_name()?.to_str()?).ok()?;
        let vg = &self.backend.spec().vg;
        if lv_device != Path::new(&format!("/dev/{vg}/{name}")) {
            return None;
        }
        let found = self.backend.thin_allocations(&[name]).ok()?;
        found.first().map(|allocation| allocation.size)
    }

    fn require_lv(&self, lv_device: &Path) -> Result<Bytes, std::io::Error> {
        self.lv_size(lv_device).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} does not exist", lv_device.display()),
            )
        })
    }

    /// What a filesystem on `device` sits on: the LV behind it, the mapping's
    /// backing LV if `device` is a crypt mapping, and the room the
    /// filesystem can use (the LV less the LUKS header when mapped).
    fn fs_target(&self, device: &Path) -> Result<(PathBuf, Option<PathBuf>, Bytes), FsError> {
        let mapping = self
            .lock()
            .mappings
            .iter()
            .find(|(name, _)| Path::new(SIM_MAPPER_DIR).join(name.as_str()) == device)
            .map(|(_, m)| m.backing.clone());
        let lv_device = mapping.clone().unwrap_or_else(|| device.to_owned());
        let lv_size = self
            .require_lv(&lv_device)
            .map_err(|source| FsError::Read {
                device: device.to_owned(),
                source,
            })?;
        let usable = if mapping.is_some() {
            lv_size.saturating_sub(SIM_HEADER)
        } else {
            lv_size
        };
        Ok((lv_device, mapping, usable))
    }

    fn mapping_path(id: &VolumeId) -> PathBuf {
        Path::new(SIM_MAPPER_DIR).join(id.crypt_name().as_str())
    }

    fn count(state: &mut SimState, id: &VolumeId, bump: impl FnOnce(&mut SimCounts)) {
        bump(state.counts.entry(id.clone()).or_default());
    }
}

fn io_error(kind: std::io::ErrorKind, text: String) -> std::io::Error {
    std::io::Error::new(kind, text)
}

impl VolumeDevices for SimDevices {
    fn format_crypt(
        &self,
        lv_device: &Path,
        id: &VolumeId,
        key: &VolumeKey,
        guard: FormatGuard,
    ) -> Result<CreateAction<()>, CryptError> {
        self.require_lv(lv_device).map_err(|source| FsError::Read {
            device: lv_device.to_owned(),
            source,
        })?;
        let mut state = self.lock();
        let lv = state.lvs.entry(lv_device.to_owned()).or_default();
        if let Some(found) = &lv.foreign {
            let unfinished_header = found == "an unfinished LUKS header";
            if !(unfinished_header && guard == FormatGuard::AllowUnfinishedOwnHeader) {
                return Err(CryptError::Occupied {
                    device: lv_device.to_owned(),
                    found: found.clone(),
                });
            }
        }
        if let Some(header) = &lv.header {
            if header.owner != *id {
                return Err(CryptError::ForeignHeader {
                    device: lv_device.to_owned(),
                    found: header.owner.to_string(),
                    expected: id.to_string(),
                });
            }
            if !header.key.same_as(key) {
                return Err(CryptError::WrongKey {
                    device: lv_device.to_owned(),
                    volume: id.clone(),
                });
            }
            return Ok(CreateAction::Identity(()));
        }
        if lv.plain_fs.is_some() {
            return Err(CryptError::Occupied {
                device: lv_device.to_owned(),
                found: "an ext2/3/4 filesystem".into(),
            });
        }
        lv.foreign = None;
        lv.header = Some(SimHeader {
            owner: id.clone(),
            key: VolumeKey::from_bytes(key.expose_secret()).expect("64 bytes"),
            fs: None,
        });
        Self::count(&mut state, id, |c| c.crypt_formats += 1);
        Ok(CreateAction::Created(()))
    }

    fn open_crypt(
        &self,
        lv_device: &Path,
        id: &VolumeId,
        key: &VolumeKey,
    ) -> Result<CreateAction<PathBuf>, CryptError> {
        let name = id.crypt_name();
        let mut state = self.lock();
        if let Some(mapping) = state.mappings.get(&name) {
            if mapping.backing == lv_device {
                return Ok(CreateAction::Identity(Self::mapping_path(id)));
            }
            return Err(CryptError::MappingConflict {
                name,
                expected: lv_device.to_owned(),
                actual: mapping.backing.clone(),
            });
        }
        let header = state.lvs.get(lv_device).and_then(|lv| lv.header.as_ref());
        match header {
            Some(header) if header.owner == *id => {
                if !header.key.same_as(key) {
                    return Err(CryptError::WrongKey {
                        device: lv_device.to_owned(),
                        volume: id.clone(),
                    });
                }
            }
            _ => {
                return Err(CryptError::NotFormatted {
                    device: lv_device.to_owned(),
                    detail: Default::default(),
                })
            }
        }
        // A re-activated mapping gets a new minor, as dm does.
        state.next_minor += 1;
        let rdev = DeviceNumber::new(DM_MAJOR, state.next_minor);
        state.mappings.insert(
            name,
            SimMapping {
                backing: lv_device.to_owned(),
                rdev,
            },
        );
        Self::count(&mut state, id, |c| c.opens += 1);
        Ok(CreateAction::Created(Self::mapping_path(id)))
    }

    fn crypt_mapping(&self, id: &VolumeId) -> Result<Option<PathBuf>, CryptError> {
        let mut state = self.lock();
        state.dm_queries += 1;
        Ok(state
            .mappings
            .contains_key(&id.crypt_name())
            .then(|| Self::mapping_path(id)))
    }

    fn crypt_mappings(&self) -> Result<BTreeMap<DmName, PathBuf>, CryptError> {
        let mut state = self.lock();
        state.dm_queries += 1;
        Ok(state
            .mappings
            .keys()
            .map(|name| (name.clone(), Path::new(SIM_MAPPER_DIR).join(name.as_str())))
            .collect())
    }

    fn close_crypt(&self, id: &VolumeId) -> Result<DeleteAction, CryptError> {
        let name = id.crypt_name();
        let mut state = self.lock();
        if state.busy.contains(&name) && state.mappings.contains_key(&name) {
            return Err(CryptError::Busy { name });
        }
        Ok(match state.mappings.remove(&name) {
            Some(_) => DeleteAction::Deleted,
            None => DeleteAction::Identity,
        })
    }

    fn resize_crypt(&self, id: &VolumeId) -> Result<(), CryptError> {
        let name = id.crypt_name();
        if self.lock().mappings.contains_key(&name) {
            Ok(())
        } else {
            Err(CryptError::Resize {
                name,
                source: libcryptsetup_rs::LibcryptErr::IOError(io_error(
                    std::io::ErrorKind::NotFound,
                    "mapping not active".into(),
                )),
                detail: Default::default(),
            })
        }
    }

    fn erase(
        &self,
        lv_device: &Path,
        id: &VolumeId,
        _encrypted: bool,
    ) -> Result<DeleteAction, CryptError> {
        let mut state = self.lock();
        let Some(lv) = state.lvs.get(lv_device) else {
            return Ok(DeleteAction::Identity);
        };
        if let Some(header) = &lv.header {
            if header.owner != *id {
                return Err(CryptError::ForeignHeader {
                    device: lv_device.to_owned(),
                    found: header.owner.to_string(),
                    expected: id.to_string(),
                });
            }
        }
        // The LV is about to be removed: what it held goes with it.
        let had_header = lv.header.is_some();
        state.lvs.remove(lv_device);
        state.lv_numbers.remove(lv_device);
        Ok(if had_header {
            DeleteAction::Deleted
        } else {
            DeleteAction::Identity
        })
    }

    fn make_fs(&self, device: &Path, id: &VolumeId) -> Result<CreateAction<()>, FsError> {
        let (lv_device, mapping, size) = self.fs_target(device)?;
        let mut state = self.lock();
        let lv = state.lvs.entry(lv_device).or_default();
        let slot = match (&mapping, lv.header.as_mut()) {
            (Some(_), Some(header)) => &mut header.fs,
            (Some(_), None) => {
                return Err(FsError::Occupied {
                    device: device.to_owned(),
                    found: "a mapping without a header".into(),
                })
            }
            (None, Some(_)) => {
                return Err(FsError::Occupied {
                    device: device.to_owned(),
                    found: "a LUKS header".into(),
                })
            }
            (None, None) => {
                if let Some(found) = &lv.foreign {
                    return Err(FsError::Occupied {
                        device: device.to_owned(),
                        found: found.clone(),
                    });
                }
                &mut lv.plain_fs
            }
        };
        match slot {
            Some(fs) if fs.owner == *id => return Ok(CreateAction::Identity(())),
            Some(fs) => {
                return Err(FsError::Occupied {
                    device: device.to_owned(),
                    found: format!("the filesystem of {}", fs.owner),
                })
            }
            None => {
                *slot = Some(SimFs {
                    owner: id.clone(),
                    size,
                })
            }
        }
        Self::count(&mut state, id, |c| c.mkfs_runs += 1);
        Ok(CreateAction::Created(()))
    }

    fn grow_fs(&self, device: &Path, _lower: Option<&Path>) -> Result<GrowOutcome, FsError> {
        let (lv_device, mapping, available) = self.fs_target(device)?;
        let mut state = self.lock();
        let lv = state.lvs.entry(lv_device).or_default();
        let fs = match (&mapping, lv.header.as_mut()) {
            (Some(_), Some(header)) => header.fs.as_mut(),
            _ => lv.plain_fs.as_mut(),
        };
        let Some(fs) = fs else {
            return Err(FsError::NotExt4 {
                device: device.to_owned(),
                found: "no known signature".into(),
            });
        };
        if fs.size >= available {
            return Ok(GrowOutcome::Grown(ExtendAction::Identity(fs.size)));
        }
        let from = fs.size;
        fs.size = available;
        let owner = fs.owner.clone();
        Self::count(&mut state, &owner, |c| c.fs_grows += 1);
        Ok(GrowOutcome::Grown(ExtendAction::Extended {
            from,
            to: available,
        }))
    }

    fn device_number(&self, device: &Path) -> Result<DeviceNumber, JailError> {
        let mut state = self.lock();
        if let Some(mapping) = state
            .mappings
            .iter()
            .find(|(name, _)| Path::new(SIM_MAPPER_DIR).join(name.as_str()) == device)
        {
            return Ok(mapping.1.rdev);
        }
        if self.lv_size(device).is_none() {
            return Err(JailError::Stat {
                path: device.to_owned(),
                source: nix::errno::Errno::ENOENT,
            });
        }
        if let Some(rdev) = state.lv_numbers.get(device) {
            return Ok(*rdev);
        }
        state.next_minor += 1;
        let rdev = DeviceNumber::new(DM_MAJOR, state.next_minor);
        state.lv_numbers.insert(device.to_owned(), rdev);
        Ok(rdev)
    }

    fn lv_copied(&self, origin: &LvName, copy: &LvName) {
        let vg = &self.backend.spec().vg;
        let path = |lv: &LvName| PathBuf::from(format!("/dev/{vg}/{lv}"));
        let mut state = self.lock();
        if let Some(content) = state.lvs.get(&path(origin)).cloned() {
            state.lvs.insert(path(copy), content);
        }
    }

    fn adopt_header(
        &self,
        lv_device: &Path,
        from: &VolumeId,
        to: &VolumeId,
    ) -> Result<CreateAction<()>, CryptError> {
        let mut state = self.lock();
        let header = state
            .lvs
            .get_mut(lv_device)
            .and_then(|lv| lv.header.as_mut());
        match header {
            Some(header) if header.owner == *to => Ok(CreateAction::Identity(())),
            Some(header) if header.owner == *from => {
                header.owner = to.clone();
                Ok(CreateAction::Created(()))
            }
            Some(header) => Err(CryptError::ForeignHeader {
                device: lv_device.to_owned(),
                found: header.owner.to_string(),
                expected: from.to_string(),
            }),
            None => Err(CryptError::NotFormatted {
                device: lv_device.to_owned(),
                detail: Default::default(),
            }),
        }
    }

    fn check_fs(&self, device: &Path) -> Result<(), FsError> {
        let (lv_device, mapping, _) = self.fs_target(device)?;
        let state = self.lock();
        let lv = state.lvs.get(&lv_device);
        let fs = match (&mapping, lv.and_then(|lv| lv.header.as_ref())) {
            (Some(_), Some(header)) => header.fs.as_ref(),
            _ => lv.and_then(|lv| lv.plain_fs.as_ref()),
        };
        match fs {
            Some(_) => Ok(()),
            None => Err(FsError::NotExt4 {
                device: device.to_owned(),
                found: "no known signature".into(),
            }),
        }
    }

    fn adopt_fs(&self, device: &Path, id: &VolumeId) -> Result<CreateAction<()>, FsError> {
        let (lv_device, mapping, _) = self.fs_target(device)?;
        let mut state = self.lock();
        let lv = state.lvs.get_mut(&lv_device);
        let fs = match (&mapping, lv) {
            (Some(_), Some(lv)) => lv.header.as_mut().and_then(|h| h.fs.as_mut()),
            (None, Some(lv)) => lv.plain_fs.as_mut(),
            (_, None) => None,
        };
        match fs {
            Some(fs) if fs.owner == *id => Ok(CreateAction::Identity(())),
            Some(fs) => {
                fs.owner = id.clone();
                Ok(CreateAction::Created(()))
            }
            None => Err(FsError::NotExt4 {
                device: device.to_owned(),
                found: "no known signature".into(),
            }),
        }
    }
}

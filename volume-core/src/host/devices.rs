//! The device operations [`super::VolumeHost`] orchestrates, behind one
//! small trait so the same orchestration runs on the real kernel
//! ([`RealDevices`]: libcryptsetup, `cmd`, `mknod`) and in fast tests
//! ([`super::sim::SimDevices`]).

use crate::actions::{CreateAction, DeleteAction};
use crate::cmd::Tools;
use crate::crypt::{self, CryptError, CryptOptions, FormatGuard};
use crate::fs::{self, FsError, GrowOutcome};
use crate::jail::{self, DeviceNumber, JailError};
use crate::keys::VolumeKey;
use crate::migrate::DirectLayer;
use crate::names::{DmName, LvName, VolumeId};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// LUKS2, ext4 and device-number operations on one volume's devices. All
/// are idempotent; see [`crate::crypt`] and [`crate::fs`] for the rules
/// (never format over data, no half-made mappings).
pub trait VolumeDevices: Send + Sync {
    fn format_crypt(
        &self,
        lv_device: &Path,
        id: &VolumeId,
        key: &VolumeKey,
        guard: FormatGuard,
    ) -> Result<CreateAction<()>, CryptError>;

    /// Opens the mapping; returns its device path.
    fn open_crypt(
        &self,
        lv_device: &Path,
        id: &VolumeId,
        key: &VolumeKey,
    ) -> Result<CreateAction<PathBuf>, CryptError>;

    /// The mapping's device path if it is open.
    fn crypt_mapping(&self, id: &VolumeId) -> Result<Option<PathBuf>, CryptError>;
    /// Every active mapping of ours and its device, in one query (a
    /// listing must not cost one query per volume).
    fn crypt_mappings(&self) -> Result<BTreeMap<DmName, PathBuf>, CryptError>;

    /// The mapping's device path if device-mapper has it, read without
    /// touching the LV under it (which is suspended while the volume is
    /// fenced, and [`VolumeDevices::crypt_mapping`] reads its header).
    fn crypt_mapping_unread(&self, id: &VolumeId) -> Option<PathBuf> {
        self.crypt_mapping(id).ok().flatten()
    }

    fn close_crypt(&self, id: &VolumeId) -> Result<DeleteAction, CryptError>;

    /// The dm-crypt options mappings are opened with (a hydration opens its
    /// mapping itself, over the copying layer).
    fn crypt_options(&self) -> CryptOptions {
        CryptOptions::default()
    }

    /// Grows an open mapping to fill its grown LV.
    fn resize_crypt(&self, id: &VolumeId) -> Result<(), CryptError>;

    /// Removes what makes the LV's content readable before the LV is
    /// removed: the LUKS2 header of an encrypted volume. Called on a closed
    /// volume only.
    fn erase(
        &self,
        lv_device: &Path,
        id: &VolumeId,
        encrypted: bool,
    ) -> Result<DeleteAction, CryptError>;

    fn make_fs(&self, device: &Path, id: &VolumeId) -> Result<CreateAction<()>, FsError>;

    /// Grows the filesystem on `device` unless something holds it, or
    /// `lower` (the LV under a mapping), open; see [`crate::fs::grow_ext4`].
    fn grow_fs(&self, device: &Path, lower: Option<&Path>) -> Result<GrowOutcome, FsError>;

    /// The current `st_rdev` of a block device.
    fn device_number(&self, device: &Path) -> Result<DeviceNumber, JailError>;

    /// The pool has made `copy` a thin snapshot of `origin`: block for
    /// block the same content. Real devices need nothing (the pool shares
    /// the blocks); the simulator copies its model of the content.
    fn lv_copied(&self, origin: &LvName, copy: &LvName);

    /// Makes the LUKS2 header on `lv_device`, copied from volume `from`,
    /// volume `to`'s; see [`crate::crypt::adopt_header`].
    fn adopt_header(
        &self,
        lv_device: &Path,
        from: &VolumeId,
        to: &VolumeId,
    ) -> Result<CreateAction<()>, CryptError>;

    /// Replays the journal of a restored copy and fixes what a crash
    /// safely leaves; see [`crate::fs::check_ext4`].
    fn check_fs(&self, device: &Path) -> Result<(), FsError>;

    /// Gives the restored copy's filesystem on `device` volume `id`'s UUID
    /// and label; see [`crate::fs::adopt_ext4`].
    fn adopt_fs(&self, device: &Path, id: &VolumeId) -> Result<CreateAction<()>, FsError>;
}

/// The direct layer a hydrated volume's open mapping still sits on, if any.
fn direct_layer_under(id: &VolumeId) -> Result<Option<DirectLayer>, CryptError> {
    let Some((_, backing)) = crypt::status(id)? else {
        return Ok(None);
    };
    DirectLayer::at(&backing).map_err(|reason| CryptError::List { reason })
}

fn io_failure(reason: String) -> libcryptsetup_rs::LibcryptErr {
    libcryptsetup_rs::LibcryptErr::IOError(std::io::Error::other(reason))
}

/// The real devices: libcryptsetup in process, `mkfs.ext4`/`e2fsck`/
/// `resize2fs` through [`crate::cmd`].
#[derive(Debug, Clone)]
pub struct RealDevices {
    tools: Tools,
    options: CryptOptions,
    mountinfo: PathBuf,
}

impl RealDevices {
    /// `tools` from [`Tools::locate`] at start-up; `mountinfo` is normally
    /// `/proc/self/mountinfo`.
    pub fn new(tools: Tools, options: CryptOptions, mountinfo: impl Into<PathBuf>) -> RealDevices {
        RealDevices {
            tools,
            options,
            mountinfo: mountinfo.into(),
        }
    }

    /// Locates the tools and uses the default options and mountinfo.
    pub fn locate() -> Result<RealDevices, crate::cmd::CmdError> {
        RealDevices::locate_with(CryptOptions::default())
    }

    /// Locates the tools and uses `options` and the default mountinfo.
    pub fn locate_with(options: CryptOptions) -> Result<RealDevices, crate::cmd::CmdError> {
        Ok(RealDevices::new(
            Tools::locate()?,
            options,
            "/proc/self/mountinfo",
        ))
    }
}

impl VolumeDevices for RealDevices {
    fn format_crypt(
        &self,
        lv_device: &Path,
        id: &VolumeId,
        key: &VolumeKey,
        guard: FormatGuard,
    ) -> Result<CreateAction<()>, CryptError> {
        crypt::format(lv_device, id, key, guard)
    }

    fn open_crypt(
        &self,
        lv_device: &Path,
        id: &VolumeId,
        key: &VolumeKey,
    ) -> Result<CreateAction<PathBuf>, CryptError> {
        match crypt::open(lv_device, id, key, &self.options) {
            // A hydrated volume's mapping still on its direct layer over
            // this very LV: the same blocks, so the mapping is the one
            // wanted.
            Err(CryptError::MappingConflict {
                name,
                expected,
                actual,
            }) => match DirectLayer::at(&actual) {
                Ok(Some(layer)) if layer.maps(lv_device) => {
                    Ok(CreateAction::Identity(crypt::mapping_path(id)))
                }
                _ => Err(CryptError::MappingConflict {
                    name,
                    expected,
                    actual,
                }),
            },
            opened => opened,
        }
    }

    fn crypt_mapping(&self, id: &VolumeId) -> Result<Option<PathBuf>, CryptError> {
        Ok(crypt::status(id)?.map(|(mapping, _)| mapping))
    }

    fn crypt_mappings(&self) -> Result<BTreeMap<DmName, PathBuf>, CryptError> {
        crypt::active_mappings()
    }

    fn crypt_mapping_unread(&self, id: &VolumeId) -> Option<PathBuf> {
        let dm = devicemapper::DM::new().ok()?;
        let crypt_name = id.crypt_name();
        let name = devicemapper::DmName::new(crypt_name.as_str()).ok()?;
        dm.device_info(&devicemapper::DevId::Name(name))
            .ok()
            .map(|_| crypt::mapping_path(id))
    }

    fn close_crypt(&self, id: &VolumeId) -> Result<DeleteAction, CryptError> {
        let layer = direct_layer_under(id)?;
        let closed = crypt::close(id)?;
        if let Some(layer) = layer {
            // Nothing holds it now; left, it would hold the LV open.
            layer.remove().map_err(|reason| CryptError::Deactivate {
                name: layer.name().clone(),
                source: io_failure(reason),
                detail: Default::default(),
            })?;
        }
        Ok(closed)
    }

    fn resize_crypt(&self, id: &VolumeId) -> Result<(), CryptError> {
        // dm-crypt takes its size from the device under it.
        if let Some(layer) = direct_layer_under(id)? {
            let _ = layer.grow().map_err(|reason| CryptError::Resize {
                name: layer.name().clone(),
                source: io_failure(reason),
                detail: Default::default(),
            })?;
        }
        crypt::resize(id)
    }

    fn crypt_options(&self) -> CryptOptions {
        self.options
    }

    fn erase(
        &self,
        lv_device: &Path,
        id: &VolumeId,
        encrypted: bool,
    ) -> Result<DeleteAction, CryptError> {
        if encrypted {
            crypt::erase(lv_device, id)
        } else {
            // A plain volume's blocks go back to the pool with the LV; the
            // pool zeroes blocks when it provisions them again.
            Ok(DeleteAction::Identity)
        }
    }

    fn make_fs(&self, device: &Path, id: &VolumeId) -> Result<CreateAction<()>, FsError> {
        Ok(match fs::make_ext4(&self.tools, device, id)? {
            CreateAction::Created(_) => CreateAction::Created(()),
            CreateAction::Identity(_) => CreateAction::Identity(()),
        })
    }

    fn grow_fs(&self, device: &Path, lower: Option<&Path>) -> Result<GrowOutcome, FsError> {
        fs::grow_ext4(&self.tools, device, lower, &self.mountinfo)
    }

    fn device_number(&self, device: &Path) -> Result<DeviceNumber, JailError> {
        jail::device_number(device)
    }

    fn lv_copied(&self, _origin: &LvName, _copy: &LvName) {}

    fn adopt_header(
        &self,
        lv_device: &Path,
        from: &VolumeId,
        to: &VolumeId,
    ) -> Result<CreateAction<()>, CryptError> {
        crypt::adopt_header(lv_device, from, to)
    }

    fn check_fs(&self, device: &Path) -> Result<(), FsError> {
        fs::check_ext4(&self.tools, device)
    }

    fn adopt_fs(&self, device: &Path, id: &VolumeId) -> Result<CreateAction<()>, FsError> {
        Ok(match fs::adopt_ext4(&self.tools, device, id)? {
            CreateAction::Created(_) => CreateAction::Created(()),
            CreateAction::Identity(_) => CreateAction::Identity(()),
        })
    }
}

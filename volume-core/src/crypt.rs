//! dm-crypt / LUKS2 through libcryptsetup, in process.
//!
//! Layout of every volume's header: LUKS2, `aes-xts-plain64` with a 512-bit
//! key (AES-256-XTS), 4096-byte encryption sectors (one dm-crypt operation
//! per filesystem block instead of eight), a 16 KiB metadata area and a
//! 1 MiB keyslots area (the default 16 MiB would provision 16 MiB of thin
//! pool per volume for a keyslot that needs 250 KiB), the header UUID
//! derived from the volume id and the label set to the mapping name, so that
//! "ours" is checkable.
//!
//! The volume key is our [`VolumeKey`], handed to `crypt_format`. One
//! keyslot holds it too, with the key itself as passphrase, so an operator
//! can open the volume with `cryptsetup open --key-file <key file>`. That
//! keyslot uses PBKDF2 with the minimum 1000 iterations and no benchmark:
//! a PBKDF exists to slow down guessing of a human passphrase, and a
//! 512-bit random passphrase cannot be guessed at any speed, so Argon2's
//! seconds of CPU and memory per open would buy nothing.
//!
//! Every operation is idempotent: format finds its own header and stops;
//! open finds its own mapping and stops; close of a missing mapping is
//! `Identity`. Format never writes over a signature it did not make, and a
//! failed open removes the mapping it may have half made.

use crate::actions::{CreateAction, DeleteAction};
use crate::fs::{self, volume_uuid, FsError, Signature, UuidPurpose};
use crate::keys::VolumeKey;
use crate::names::{DmName, VolumeId, NAME_PREFIX};
use libcryptsetup_rs::consts::flags::{CryptActivate, CryptDeactivate, CryptPbkdf, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{
    CryptKdf, CryptStatusInfo, EncryptionFormat, KeyslotInfo, KeyslotsSize, MetadataSize,
};
use libcryptsetup_rs::{
    CryptDevice, CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, CryptPbkdfType, Either,
    LibcryptErr,
};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::Once;

pub const CIPHER: &str = "aes";
pub const CIPHER_MODE: &str = "xts-plain64";
pub const SECTOR_SIZE: u32 = 4096;
/// The minimum libcryptsetup accepts for PBKDF2; see the module docs.
pub const PBKDF2_ITERATIONS: u32 = 1000;
const KEYSLOTS_AREA: u64 = 1 << 20;
const KEYSLOT: u32 = 0;

/// dm-crypt activation flags, configurable per host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CryptOptions {
    /// Decrypt reads in the submitting context instead of a kernel
    /// workqueue: lower latency on fast devices.
    pub no_read_workqueue: bool,
    /// Encrypt writes in the submitting context.
    pub no_write_workqueue: bool,
    /// Pass discards through to the thin LV so freed guest blocks return to
    /// the pool. It reveals which blocks are unused, which a thin pool's own
    /// allocation map reveals anyway.
    pub allow_discards: bool,
}

impl Default for CryptOptions {
    fn default() -> Self {
        CryptOptions {
            no_read_workqueue: true,
            no_write_workqueue: true,
            allow_discards: true,
        }
    }
}

impl CryptOptions {
    fn flags(&self) -> CryptActivate {
        let mut flags = CryptActivate::empty();
        flags.set(CryptActivate::NO_READ_WORKQUEUE, self.no_read_workqueue);
        flags.set(CryptActivate::NO_WRITE_WORKQUEUE, self.no_write_workqueue);
        flags.set(CryptActivate::ALLOW_DISCARDS, self.allow_discards);
        flags
    }
}

/// What format may write over when there is no loadable LUKS2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatGuard {
    /// Only a device with no known signature (a fresh thin LV).
    RequireBlank,
    /// Also an unloadable LUKS header: the caller knows the device is a
    /// volume of ours whose format never finished (a crash mid-write).
    AllowUnfinishedOwnHeader,
}

/// libcryptsetup's own error lines for the last failed call, attached to
/// our errors so they say *why* (e.g. "Cannot use device ... which is in
/// use"). They never contain key material.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Detail(pub Vec<String>);

impl std::fmt::Display for Detail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, " ({})", self.0.join("; "))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error("could not open {device} for libcryptsetup: {source}{detail}")]
    Init {
        device: PathBuf,
        #[source]
        source: LibcryptErr,
        detail: Detail,
    },
    #[error("{device} has a LUKS2 header with UUID {found}, not this volume's {expected}; refusing to touch it")]
    ForeignHeader {
        device: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{device} holds {found}; refusing to format over it")]
    Occupied { device: PathBuf, found: String },
    #[error("{device} holds no LUKS2 header of this volume{detail}")]
    NotFormatted { device: PathBuf, detail: Detail },
    #[error("the key does not open the LUKS2 header on {device} (wrong key for volume {volume})")]
    WrongKey { device: PathBuf, volume: VolumeId },
    #[error("LUKS2 format of {device} failed: {source}{detail}")]
    Format {
        device: PathBuf,
        #[source]
        source: LibcryptErr,
        detail: Detail,
    },
    #[error("adding the keyslot on {device} failed: {source}{detail}")]
    Keyslot {
        device: PathBuf,
        #[source]
        source: LibcryptErr,
        detail: Detail,
    },
    #[error("activating {name} on {device} failed: {source}{detail}")]
    Activate {
        name: DmName,
        device: PathBuf,
        #[source]
        source: LibcryptErr,
        detail: Detail,
    },
    #[error("activating {name} failed ({activate}) and removing the half-made mapping failed too: {cleanup}")]
    ActivateCleanup {
        name: DmName,
        activate: Box<CryptError>,
        cleanup: Box<CryptError>,
    },
    #[error("mapping {name} exists on {actual}, not on {expected}; refusing to reuse it")]
    MappingConflict {
        name: DmName,
        expected: PathBuf,
        actual: PathBuf,
    },
    #[error("could not read the status of mapping {name}: {source}{detail}")]
    Status {
        name: DmName,
        #[source]
        source: LibcryptErr,
        detail: Detail,
    },
    #[error("could not list the device-mapper devices: {reason}")]
    List { reason: String },
    #[error("mapping {name} is in use (mounted or held open, e.g. by a VM); close it first")]
    Busy { name: DmName },
    #[error("removing mapping {name} failed: {source}{detail}")]
    Deactivate {
        name: DmName,
        #[source]
        source: LibcryptErr,
        detail: Detail,
    },
    #[error("resizing mapping {name} failed: {source}{detail}")]
    Resize {
        name: DmName,
        #[source]
        source: LibcryptErr,
        detail: Detail,
    },
    #[error("giving the LUKS2 header on {device} its new volume's UUID and label failed: {source}{detail}")]
    Adopt {
        device: PathBuf,
        #[source]
        source: LibcryptErr,
        detail: Detail,
    },
    #[error("erasing the LUKS2 header on {device} failed: {source}")]
    Erase {
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Probe(#[from] FsError),
}

thread_local! {
    static LOG_ERRORS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// Receives libcryptsetup's log lines; keeps error lines for [`Detail`].
unsafe extern "C" fn capture_log(level: c_int, msg: *const c_char, _usrptr: *mut c_void) {
    if msg.is_null() {
        return;
    }
    // SAFETY: libcryptsetup passes a NUL-terminated string that stays valid
    // for the duration of this call; we copy it before returning.
    let text = unsafe { CStr::from_ptr(msg) }
        .to_string_lossy()
        .trim_end()
        .to_owned();
    if level == CRYPT_LOG_ERROR {
        LOG_ERRORS.with(|errors| errors.borrow_mut().push(text));
    } else {
        tracing::debug!(target: "libcryptsetup", "{text}");
    }
}

/// `CRYPT_LOG_ERROR` from libcryptsetup.h.
const CRYPT_LOG_ERROR: c_int = 1;

fn install_log_capture() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| libcryptsetup_rs::set_log_callback::<()>(Some(capture_log), None));
}

/// Clears the captured lines before a call.
fn begin() {
    install_log_capture();
    LOG_ERRORS.with(|errors| errors.borrow_mut().clear());
}

/// Takes the lines captured since [`begin`].
fn detail() -> Detail {
    Detail(LOG_ERRORS.with(|errors| std::mem::take(&mut *errors.borrow_mut())))
}

fn errno_of(err: &LibcryptErr) -> Option<i32> {
    match err {
        LibcryptErr::IOError(io) => io.raw_os_error(),
        _ => None,
    }
}

/// Where libcryptsetup puts mappings (normally `/dev/mapper`).
pub fn mapper_dir() -> PathBuf {
    install_log_capture();
    libcryptsetup_rs::CryptKeyslotHandle::get_dir()
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/dev/mapper"))
}

/// The device path of `id`'s mapping.
pub fn mapping_path(id: &VolumeId) -> PathBuf {
    mapper_dir().join(id.crypt_name().as_str())
}

fn init(device: &Path) -> Result<CryptDevice, CryptError> {
    CryptInit::init(device).map_err(|source| CryptError::Init {
        device: device.to_owned(),
        source,
        detail: detail(),
    })
}

fn luks_pbkdf() -> CryptPbkdfType {
    CryptPbkdfType {
        type_: CryptKdf::Pbkdf2,
        hash: Some("sha256".to_owned()),
        time_ms: 0,
        iterations: PBKDF2_ITERATIONS,
        max_memory_kb: 0,
        parallel_threads: 0,
        flags: CryptPbkdf::NO_BENCHMARK,
    }
}

/// Loads a LUKS2 header and checks it is this volume's. `Ok(None)`: there is
/// no loadable LUKS2 header.
fn load_ours(cd: &mut CryptDevice, device: &Path, id: &VolumeId) -> Result<Option<()>, CryptError> {
    if cd
        .context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .is_err()
    {
        detail();
        return Ok(None);
    }
    let expected = volume_uuid(UuidPurpose::LuksHeader, id);
    let found = cd
        .status_handle()
        .get_uuid()
        .map(|u| u.to_string())
        .unwrap_or_else(|_| "<unreadable>".to_owned());
    if found != expected.to_string() {
        return Err(CryptError::ForeignHeader {
            device: device.to_owned(),
            found,
            expected: expected.to_string(),
        });
    }
    Ok(Some(()))
}

/// Checks `key` against the header's volume key digest (no mapping made).
fn verify_key(
    cd: &mut CryptDevice,
    device: &Path,
    id: &VolumeId,
    key: &VolumeKey,
) -> Result<(), CryptError> {
    match cd.activate_handle().activate_by_volume_key(
        None,
        Some(key.expose_secret()),
        CryptActivate::empty(),
    ) {
        Ok(()) => Ok(()),
        Err(err) if errno_of(&err) == Some(libc::EPERM) => {
            detail();
            Err(CryptError::WrongKey {
                device: device.to_owned(),
                volume: id.clone(),
            })
        }
        Err(source) => Err(CryptError::Activate {
            name: id.crypt_name(),
            device: device.to_owned(),
            source,
            detail: detail(),
        }),
    }
}

fn ensure_keyslot(cd: &mut CryptDevice, device: &Path, key: &VolumeKey) -> Result<(), CryptError> {
    let keyslot_err = |source| CryptError::Keyslot {
        device: device.to_owned(),
        source,
        detail: detail(),
    };
    match cd.keyslot_handle().status(KEYSLOT) {
        Ok(KeyslotInfo::Active | KeyslotInfo::ActiveLast) => return Ok(()),
        Ok(_) => {}
        Err(source) => return Err(keyslot_err(source)),
    }
    cd.settings_handle()
        .set_pbkdf_type(&luks_pbkdf())
        .map_err(keyslot_err)?;
    cd.keyslot_handle()
        .add_by_key(
            Some(KEYSLOT),
            Some(Either::Left(key.expose_secret())),
            key.expose_secret(),
            CryptVolumeKey::empty(),
        )
        .map_err(keyslot_err)?;
    Ok(())
}

/// Formats `device` as this volume's LUKS2 device with `key`, unless it
/// already is (`Identity`, after checking the key and the keyslot). Never
/// writes over a foreign header or any other signature (see [`FormatGuard`]).
pub fn format(
    device: &Path,
    id: &VolumeId,
    key: &VolumeKey,
    guard: FormatGuard,
) -> Result<CreateAction<()>, CryptError> {
    begin();
    let mut cd = init(device)?;
    if load_ours(&mut cd, device, id)?.is_some() {
        verify_key(&mut cd, device, id, key)?;
        // A crash between format and keyslot leaves a header without one.
        ensure_keyslot(&mut cd, device, key)?;
        return Ok(CreateAction::Identity(()));
    }
    drop(cd);
    match fs::probe(device)? {
        Signature::Nothing => {}
        Signature::Luks if guard == FormatGuard::AllowUnfinishedOwnHeader => {}
        found => {
            return Err(CryptError::Occupied {
                device: device.to_owned(),
                found: found.to_string(),
            })
        }
    }
    let format_err = |source| CryptError::Format {
        device: device.to_owned(),
        source,
        detail: detail(),
    };
    let mut cd = init(device)?;
    cd.settings_handle()
        .set_metadata_size(
            MetadataSize::Kb16,
            KeyslotsSize::try_from(KEYSLOTS_AREA).map_err(format_err)?,
        )
        .map_err(format_err)?;
    let params = CryptParamsLuks2 {
        pbkdf: Some(luks_pbkdf()),
        integrity: None,
        integrity_params: None,
        data_alignment: 0,
        data_device: None,
        sector_size: SECTOR_SIZE,
        label: Some(id.crypt_name().to_string()),
        subsystem: Some(NAME_PREFIX.to_owned()),
    };
    let mut params_ref: CryptParamsLuks2Ref<'_> = (&params).try_into().map_err(format_err)?;
    cd.context_handle()
        .format(
            EncryptionFormat::Luks2,
            (CIPHER, CIPHER_MODE),
            Some(volume_uuid(UuidPurpose::LuksHeader, id)),
            Either::Left(key.expose_secret()),
            Some(&mut params_ref),
        )
        .map_err(format_err)?;
    ensure_keyslot(&mut cd, device, key)?;
    tracing::info!(device = %device.display(), volume = %id, "formatted LUKS2");
    Ok(CreateAction::Created(()))
}

/// The backing device of `name`'s mapping, if it is active.
fn active_backing(name: &DmName) -> Result<Option<PathBuf>, CryptError> {
    let status_err = |source| CryptError::Status {
        name: name.clone(),
        source,
        detail: detail(),
    };
    match libcryptsetup_rs::status(None, name.as_str()).map_err(status_err)? {
        CryptStatusInfo::Active | CryptStatusInfo::Busy => {}
        CryptStatusInfo::Inactive | CryptStatusInfo::Invalid => return Ok(None),
    }
    let mut cd = CryptInit::init_by_name_and_header(name.as_str(), None).map_err(status_err)?;
    let path = cd
        .status_handle()
        .get_device_path()
        .map_err(status_err)?
        .to_owned();
    Ok(Some(path))
}

/// Whether two paths name the same block device.
fn same_device(a: &Path, b: &Path) -> bool {
    match (crate::jail::device_number(a), crate::jail::device_number(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Every device-mapper device carrying our crypt prefix and its path, from
/// one `DM_LIST_DEVICES` ioctl: listing N volumes costs one query, not a
/// status per encrypted volume.
pub fn active_mappings() -> Result<BTreeMap<DmName, PathBuf>, CryptError> {
    let list_err = |error: devicemapper::DmError| CryptError::List {
        reason: error.to_string(),
    };
    let dm = devicemapper::DM::new().map_err(list_err)?;
    let prefix = format!("{NAME_PREFIX}-crypt-");
    Ok(dm
        .list_devices()
        .map_err(list_err)?
        .into_iter()
        .filter_map(|(name, _, _)| {
            let name = name.to_string();
            if !name.starts_with(&prefix) {
                return None;
            }
            let path = mapper_dir().join(&name);
            Some((DmName::new(name).ok()?, path))
        })
        .collect())
}

/// The mapping of `id` if it is active: `(mapping path, backing device)`.
pub fn status(id: &VolumeId) -> Result<Option<(PathBuf, PathBuf)>, CryptError> {
    begin();
    Ok(active_backing(&id.crypt_name())?.map(|backing| (mapping_path(id), backing)))
}

/// Opens `id`'s mapping on `device` with `key`; `Identity` if it is already
/// open on that device. A wrong key is [`CryptError::WrongKey`]. A failed
/// activation leaves no mapping behind (or says that removing it failed).
pub fn open(
    device: &Path,
    id: &VolumeId,
    key: &VolumeKey,
    options: &CryptOptions,
) -> Result<CreateAction<PathBuf>, CryptError> {
    begin();
    let name = id.crypt_name();
    if let Some(backing) = active_backing(&name)? {
        if same_device(&backing, device) {
            return Ok(CreateAction::Identity(mapping_path(id)));
        }
        return Err(CryptError::MappingConflict {
            name,
            expected: device.to_owned(),
            actual: backing,
        });
    }
    let mut cd = init(device)?;
    if load_ours(&mut cd, device, id)?.is_none() {
        return Err(CryptError::NotFormatted {
            device: device.to_owned(),
            detail: detail(),
        });
    }
    // The key goes into the dm table rather than the kernel keyring: a
    // resize reloads the table, which with the keyring would need the key
    // again, and the key store is the custody point either way.
    cd.context_handle()
        .volume_key_keyring(false)
        .map_err(|source| CryptError::Activate {
            name: name.clone(),
            device: device.to_owned(),
            source,
            detail: detail(),
        })?;
    let activated = cd.activate_handle().activate_by_volume_key(
        Some(name.as_str()),
        Some(key.expose_secret()),
        options.flags(),
    );
    let Err(source) = activated else {
        tracing::info!(device = %device.display(), mapping = %name, "opened");
        return Ok(CreateAction::Created(mapping_path(id)));
    };
    let failure = if errno_of(&source) == Some(libc::EPERM) {
        detail();
        CryptError::WrongKey {
            device: device.to_owned(),
            volume: id.clone(),
        }
    } else {
        CryptError::Activate {
            name: name.clone(),
            device: device.to_owned(),
            source,
            detail: detail(),
        }
    };
    drop(cd);
    match close_by_name(&name) {
        Ok(_) => Err(failure),
        Err(cleanup) => Err(CryptError::ActivateCleanup {
            name,
            activate: Box::new(failure),
            cleanup: Box::new(cleanup),
        }),
    }
}

fn close_by_name(name: &DmName) -> Result<DeleteAction, CryptError> {
    if active_backing(name)?.is_none() {
        return Ok(DeleteAction::Identity);
    }
    let mut cd = CryptInit::init_by_name_and_header(name.as_str(), None).map_err(|source| {
        CryptError::Status {
            name: name.clone(),
            source,
            detail: detail(),
        }
    })?;
    match cd
        .activate_handle()
        .deactivate(name.as_str(), CryptDeactivate::empty())
    {
        Ok(()) => Ok(DeleteAction::Deleted),
        Err(err) if errno_of(&err) == Some(libc::EBUSY) => {
            detail();
            Err(CryptError::Busy { name: name.clone() })
        }
        Err(source) => Err(CryptError::Deactivate {
            name: name.clone(),
            source,
            detail: detail(),
        }),
    }
}

/// Removes `id`'s mapping; `Identity` if it is not open.
pub fn close(id: &VolumeId) -> Result<DeleteAction, CryptError> {
    begin();
    let closed = close_by_name(&id.crypt_name())?;
    if closed.changed() {
        tracing::info!(mapping = %id.crypt_name(), "closed");
    }
    Ok(closed)
}

/// Wipes `id`'s LUKS2 header (both copies and the keyslots) from a closed
/// `device`, so the data cannot be decrypted even with a copy of the key
/// that outlived the key store; `Identity` if there is no header of ours.
/// A foreign header is refused.
pub fn erase(device: &Path, id: &VolumeId) -> Result<DeleteAction, CryptError> {
    begin();
    let mut cd = init(device)?;
    if load_ours(&mut cd, device, id)?.is_none() {
        return Ok(DeleteAction::Identity);
    }
    let header_bytes = cd.status_handle().get_data_offset() * 512;
    drop(cd);
    let erase_err = |source: std::io::Error| CryptError::Erase {
        device: device.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .map_err(erase_err)?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = header_bytes;
    while left > 0 {
        let chunk = left.min(zeros.len() as u64) as usize;
        std::io::Write::write_all(&mut file, &zeros[..chunk]).map_err(erase_err)?;
        left -= chunk as u64;
    }
    file.sync_all().map_err(erase_err)?;
    tracing::info!(device = %device.display(), volume = %id, "erased LUKS2 header");
    Ok(DeleteAction::Deleted)
}

/// Makes the LUKS2 header on `device`, a copy of volume `from`'s (a restore
/// from a snapshot of it), volume `to`'s: its UUID and label are set to
/// `to`'s, so every later "is this ours" check (open, erase, format) is
/// `to`'s. The volume key, keyslot and data are untouched: the copy is
/// opened with `from`'s key, stored again under `to`. `Identity` if the
/// header is `to`'s already; any other header is refused.
pub fn adopt_header(
    device: &Path,
    from: &VolumeId,
    to: &VolumeId,
) -> Result<CreateAction<()>, CryptError> {
    begin();
    let mut cd = init(device)?;
    if cd
        .context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .is_err()
    {
        return Err(CryptError::NotFormatted {
            device: device.to_owned(),
            detail: detail(),
        });
    }
    let found = cd
        .status_handle()
        .get_uuid()
        .map(|u| u.to_string())
        .unwrap_or_else(|_| "<unreadable>".to_owned());
    let target = volume_uuid(UuidPurpose::LuksHeader, to);
    if found == target.to_string() {
        return Ok(CreateAction::Identity(()));
    }
    let expected = volume_uuid(UuidPurpose::LuksHeader, from).to_string();
    if found != expected {
        return Err(CryptError::ForeignHeader {
            device: device.to_owned(),
            found,
            expected,
        });
    }
    let adopt_err = |source| CryptError::Adopt {
        device: device.to_owned(),
        source,
        detail: detail(),
    };
    // Label first: the UUID is what "ours" is read from, so a crash in
    // between leaves a header that is still `from`'s and is adopted again.
    cd.context_handle()
        .set_label(Some(to.crypt_name().as_str()), None)
        .map_err(adopt_err)?;
    cd.context_handle()
        .set_uuid(Some(target))
        .map_err(adopt_err)?;
    tracing::info!(device = %device.display(), %from, %to, "adopted LUKS2 header");
    Ok(CreateAction::Created(()))
}

/// Grows `id`'s open mapping to fill its (grown) backing device.
pub fn resize(id: &VolumeId) -> Result<(), CryptError> {
    begin();
    let name = id.crypt_name();
    let resize_err = |source| CryptError::Resize {
        name: name.clone(),
        source,
        detail: detail(),
    };
    let mut cd = CryptInit::init_by_name_and_header(name.as_str(), None).map_err(resize_err)?;
    // Size 0: fill the backing device less the header.
    cd.context_handle()
        .resize(name.as_str(), 0)
        .map_err(resize_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_flags_are_the_fast_path() {
        let flags = CryptOptions::default().flags();
        assert!(flags.contains(CryptActivate::NO_READ_WORKQUEUE));
        assert!(flags.contains(CryptActivate::NO_WRITE_WORKQUEUE));
        assert!(flags.contains(CryptActivate::ALLOW_DISCARDS));
        let none = CryptOptions {
            no_read_workqueue: false,
            no_write_workqueue: false,
            allow_discards: false,
        };
        assert!(none.flags().is_empty());
    }

    #[test]
    fn keyslot_pbkdf_is_minimal_pbkdf2() {
        let pbkdf = luks_pbkdf();
        assert!(matches!(pbkdf.type_, CryptKdf::Pbkdf2));
        assert_eq!(pbkdf.iterations, 1000);
        assert!(pbkdf.flags.contains(CryptPbkdf::NO_BENCHMARK));
    }

    #[test]
    fn format_refuses_foreign_signatures_without_touching_them() {
        // Runs without device-mapper: libcryptsetup formats regular files
        // through a loop device only, but the refusal happens before that.
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img");
        let mut bytes = vec![0u8; 4 << 20];
        bytes[1080..1082].copy_from_slice(&0xEF53u16.to_le_bytes());
        std::fs::write(&image, &bytes).unwrap();
        let key = VolumeKey::generate().unwrap();
        let err = format(
            &image,
            &VolumeId::generate(),
            &key,
            FormatGuard::AllowUnfinishedOwnHeader,
        )
        .unwrap_err();
        assert!(matches!(err, CryptError::Occupied { .. }), "{err}");
        assert!(err.to_string().contains("ext2/3/4"), "{err}");
        assert_eq!(std::fs::read(&image).unwrap(), bytes);
    }

    #[test]
    fn errors_carry_no_key_material() {
        let key = VolumeKey::from_bytes(&[0x5A; 64]).unwrap();
        let err = CryptError::WrongKey {
            device: PathBuf::from("/dev/x"),
            volume: VolumeId::new("vol_0123456789abcdef").unwrap(),
        };
        let text = format!("{err} {err:?} {key:?}");
        assert!(!text.contains("5a5a") && !text.contains("5A5A") && !text.contains("90, 90"));
    }
}

/// LUKS2 headers on image files: libcryptsetup formats and loads files
/// without device-mapper, so these run on any host.
#[cfg(test)]
mod header_tests {
    use super::*;

    fn blank_image(dir: &Path) -> PathBuf {
        let image = dir.join("img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        image
    }

    #[test]
    fn format_is_idempotent_and_makes_the_documented_header() {
        let dir = tempfile::tempdir().unwrap();
        let image = blank_image(dir.path());
        let (id, key) = (VolumeId::generate(), VolumeKey::generate().unwrap());
        assert!(format(&image, &id, &key, FormatGuard::RequireBlank)
            .unwrap()
            .changed());
        let header = std::fs::read(&image).unwrap()[..1 << 20].to_vec();
        assert!(!format(&image, &id, &key, FormatGuard::RequireBlank)
            .unwrap()
            .changed());
        assert_eq!(std::fs::read(&image).unwrap()[..1 << 20], header[..]);

        let mut cd = CryptInit::init(&image).unwrap();
        cd.context_handle()
            .load::<()>(Some(EncryptionFormat::Luks2), None)
            .unwrap();
        assert_eq!(cd.status_handle().get_cipher().unwrap(), CIPHER);
        assert_eq!(cd.status_handle().get_cipher_mode().unwrap(), CIPHER_MODE);
        assert_eq!(cd.status_handle().get_volume_key_size(), 64);
        assert_eq!(
            libcryptsetup_rs::get_sector_size(Some(&mut cd)),
            SECTOR_SIZE as i32
        );
        assert_eq!(
            cd.status_handle().get_uuid().unwrap(),
            volume_uuid(UuidPurpose::LuksHeader, &id)
        );
        // Data starts after 2 x 16 KiB metadata + 1 MiB keyslots, not 16 MiB.
        assert!(cd.status_handle().get_data_offset() * 512 <= 2 << 20);
        let pbkdf = cd.keyslot_handle().get_pbkdf(KEYSLOT).unwrap();
        assert!(matches!(pbkdf.type_, CryptKdf::Pbkdf2));
        assert_eq!(pbkdf.iterations, PBKDF2_ITERATIONS);
        // The keyslot opens with the key as passphrase (operator recovery).
        assert_eq!(
            cd.activate_handle()
                .activate_by_passphrase(None, None, key.expose_secret(), CryptActivate::empty())
                .unwrap(),
            KEYSLOT
        );
    }

    #[test]
    fn wrong_key_and_foreign_header_are_refused_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let image = blank_image(dir.path());
        let (id, key) = (VolumeId::generate(), VolumeKey::generate().unwrap());
        let _ = format(&image, &id, &key, FormatGuard::RequireBlank).unwrap();
        let before = std::fs::read(&image).unwrap();
        let wrong = VolumeKey::generate().unwrap();
        let err = format(&image, &id, &wrong, FormatGuard::AllowUnfinishedOwnHeader).unwrap_err();
        assert!(matches!(err, CryptError::WrongKey { .. }), "{err}");
        assert!(err.to_string().contains("wrong key"), "{err}");
        let other = VolumeId::generate();
        let err = format(&image, &other, &key, FormatGuard::AllowUnfinishedOwnHeader).unwrap_err();
        assert!(matches!(err, CryptError::ForeignHeader { .. }), "{err}");
        assert_eq!(std::fs::read(&image).unwrap(), before);
    }

    #[test]
    fn an_unfinished_header_is_replaced_only_when_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let image = blank_image(dir.path());
        // What a crash in the middle of writing a header can leave: the
        // magic, then nothing loadable.
        let mut file = std::fs::File::options().write(true).open(&image).unwrap();
        std::io::Write::write_all(&mut file, b"LUKS\xba\xbe\x00\x02").unwrap();
        drop(file);
        let (id, key) = (VolumeId::generate(), VolumeKey::generate().unwrap());
        let err = format(&image, &id, &key, FormatGuard::RequireBlank).unwrap_err();
        assert!(matches!(err, CryptError::Occupied { .. }), "{err}");
        assert!(
            format(&image, &id, &key, FormatGuard::AllowUnfinishedOwnHeader)
                .unwrap()
                .changed()
        );
        assert!(!format(&image, &id, &key, FormatGuard::RequireBlank)
            .unwrap()
            .changed());
    }

    #[test]
    fn a_header_without_its_keyslot_gets_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let image = blank_image(dir.path());
        let (id, key) = (VolumeId::generate(), VolumeKey::generate().unwrap());
        let _ = format(&image, &id, &key, FormatGuard::RequireBlank).unwrap();
        // As if we crashed between crypt_format and the keyslot.
        let mut cd = CryptInit::init(&image).unwrap();
        cd.context_handle()
            .load::<()>(Some(EncryptionFormat::Luks2), None)
            .unwrap();
        cd.keyslot_handle().destroy(KEYSLOT).unwrap();
        drop(cd);
        assert!(!format(&image, &id, &key, FormatGuard::RequireBlank)
            .unwrap()
            .changed());
        let mut cd = CryptInit::init(&image).unwrap();
        cd.context_handle()
            .load::<()>(Some(EncryptionFormat::Luks2), None)
            .unwrap();
        assert!(matches!(
            cd.keyslot_handle().status(KEYSLOT).unwrap(),
            KeyslotInfo::Active | KeyslotInfo::ActiveLast
        ));
    }

    #[test]
    fn erase_wipes_only_our_header() {
        let dir = tempfile::tempdir().unwrap();
        let image = blank_image(dir.path());
        let (id, key) = (VolumeId::generate(), VolumeKey::generate().unwrap());
        let _ = format(&image, &id, &key, FormatGuard::RequireBlank).unwrap();
        let before = std::fs::read(&image).unwrap();
        assert!(matches!(
            erase(&image, &VolumeId::generate()),
            Err(CryptError::ForeignHeader { .. })
        ));
        assert_eq!(std::fs::read(&image).unwrap(), before);
        assert_eq!(erase(&image, &id).unwrap(), DeleteAction::Deleted);
        assert_eq!(fs::probe(&image).unwrap(), Signature::Nothing);
        let after = std::fs::read(&image).unwrap();
        assert!(after[..1 << 20].iter().all(|b| *b == 0));
        assert_eq!(erase(&image, &id).unwrap(), DeleteAction::Identity);
        // The key no longer opens anything: there is no header.
        assert!(matches!(
            open(&image, &id, &key, &CryptOptions::default()),
            Err(CryptError::NotFormatted { .. })
        ));
    }

    #[test]
    fn open_of_a_blank_device_says_it_is_not_formatted() {
        let dir = tempfile::tempdir().unwrap();
        let image = blank_image(dir.path());
        let id = VolumeId::generate();
        let err = open(
            &image,
            &id,
            &VolumeKey::generate().unwrap(),
            &CryptOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, CryptError::NotFormatted { .. }), "{err}");
        assert_eq!(status(&id).unwrap(), None);
        assert_eq!(close(&id).unwrap(), DeleteAction::Identity);
    }
}

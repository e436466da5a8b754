//! Volume keys and where they are kept.
//!
//! A [`VolumeKey`] is 512 random bits, one per volume. It and the KEK live
//! in locked memory (`mlock`, excluded from core dumps, zeroed when
//! dropped), have no `Display`, and their `Debug` is redacted, so they
//! cannot reach swap, a core file, a log line or an error by accident. An
//! all-zero key is never a real key (odds 2^-512) and is refused wherever
//! one is read. Two [`KeyStore`]s keep keys:
//!
//! * [`LocalKeyDir`]: one file per volume in a `0700` directory, each file
//!   `0600`, written atomically (temporary file, `fsync`, hard link into
//!   place so an existing key is never replaced, `fsync` of the directory).
//!   Removal first renames the file to a tombstone name that is never
//!   loaded (and `fsync`s the directory), then overwrites and unlinks the
//!   tombstone, so a crash at any step leaves either the whole key or no
//!   loadable file.
//! * [`EnvelopeKeyStore`]: the key is sealed with XChaCha20-Poly1305 under a
//!   key-encryption key (KEK) read from a file, with the volume id as
//!   associated data, so a sealed key can live in the control plane: without
//!   the KEK it reveals nothing, and it cannot be swapped onto another
//!   volume. Sealed bytes are kept by a [`SealedKeyStorage`]; this crate
//!   ships [`LocalSealedStorage`], the daemon adds one over its KV store.
//!
//! Destroying a volume destroys its key ([`KeyStore::destroy`]).

use crate::actions::{CreateAction, DeleteAction};
use crate::locked::{LockError, LockedBytes};
use crate::names::VolumeId;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Bytes in a volume key: 512 bits, the size of an AES-256-XTS key.
pub const VOLUME_KEY_BYTES: usize = 64;
/// Bytes in a key-encryption key (XChaCha20-Poly1305).
pub const KEK_BYTES: usize = 32;

/// A volume's secret. Never printed, never cloned implicitly, kept in
/// locked memory and wiped on drop.
pub struct VolumeKey(LockedBytes<VOLUME_KEY_BYTES>);

pub(crate) fn locked<const N: usize>() -> Result<LockedBytes<N>, KeyError> {
    LockedBytes::new().map_err(KeyError::LockedMemory)
}

/// Fills `buffer` from the operating system's random source; never leaves
/// it all-zero.
pub(crate) fn fill_random(buffer: &mut [u8]) -> Result<(), KeyError> {
    loop {
        getrandom::fill(buffer).map_err(|e| KeyError::Random {
            reason: e.to_string(),
        })?;
        if !all_zero(buffer) {
            return Ok(());
        }
    }
}

pub(crate) fn all_zero(bytes: &[u8]) -> bool {
    bytes.ct_eq(&vec![0u8; bytes.len()]).into()
}

/// Copies exactly `N` bytes into locked memory; refuses other lengths and
/// all-zero bytes.
fn locked_copy<const N: usize>(
    what: &'static str,
    bytes: &[u8],
) -> Result<LockedBytes<N>, KeyError> {
    if bytes.len() != N {
        return Err(KeyError::Length {
            what,
            len: bytes.len(),
            expected: N,
        });
    }
    if all_zero(bytes) {
        return Err(KeyError::Blank { what });
    }
    let mut secret = locked::<N>()?;
    secret.as_mut_slice().copy_from_slice(bytes);
    Ok(secret)
}

impl VolumeKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<VolumeKey, KeyError> {
        let mut key = VolumeKey(locked()?);
        fill_random(key.0.as_mut_slice())?;
        Ok(key)
    }

    /// A key from exactly [`VOLUME_KEY_BYTES`] bytes, not all zero.
    pub fn from_bytes(bytes: &[u8]) -> Result<VolumeKey, KeyError> {
        locked_copy("volume key", bytes).map(VolumeKey)
    }

    /// The raw key, for libcryptsetup and for sealing. Callers must not copy
    /// it anywhere that outlives the call.
    pub fn expose_secret(&self) -> &[u8] {
        self.0.as_slice()
    }

    /// Constant-time comparison: whether two keys are the same.
    pub fn same_as(&self, other: &VolumeKey) -> bool {
        self.0.as_slice().ct_eq(other.0.as_slice()).into()
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeKey(<redacted>)")
    }
}

/// Bytes in a migration secret: the TLS pre-shared key of one migration's
/// NBD connection.
pub const MIGRATION_SECRET_BYTES: usize = 32;

/// The pre-shared key that authenticates one migration's NBD connection
/// (TLS-PSK): both hosts hold it, nobody else. Kept like a volume key.
pub struct MigrationSecret(LockedBytes<MIGRATION_SECRET_BYTES>);

impl MigrationSecret {
    pub fn generate() -> Result<MigrationSecret, KeyError> {
        let mut secret = MigrationSecret(locked()?);
        fill_random(secret.0.as_mut_slice())?;
        Ok(secret)
    }

    /// From exactly [`MIGRATION_SECRET_BYTES`] bytes, not all zero.
    pub fn from_bytes(bytes: &[u8]) -> Result<MigrationSecret, KeyError> {
        locked_copy("migration secret", bytes).map(MigrationSecret)
    }

    pub fn expose_secret(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl fmt::Debug for MigrationSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MigrationSecret(<redacted>)")
    }
}

/// Key custody failures. None of them carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("could not read random bytes for a new key: {reason}")]
    Random { reason: String },
    #[error("{what} must be {expected} bytes, got {len}")]
    Length {
        what: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("{what} is all zero bytes, which is never a real key; refusing to use it")]
    Blank { what: &'static str },
    #[error("{path} holds {len} zero bytes, not a key (a removal interrupted by a crash?); refusing to use it")]
    AllZero { path: PathBuf, len: usize },
    #[error(transparent)]
    LockedMemory(LockError),
    #[error("could not create key directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not inspect {path}: {source}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a directory (or is a symlink); refusing to keep keys there")]
    NotADirectory { path: PathBuf },
    #[error("{path} is not a regular file; refusing to read a key from it")]
    NotAFile { path: PathBuf },
    #[error("{path} has mode {mode:04o} or owner uid {uid}; keys need mode 0700/0600 (no group or other access) and owner uid {expected_uid}")]
    InsecurePermissions {
        path: PathBuf,
        mode: u32,
        uid: u32,
        expected_uid: u32,
    },
    #[error("could not write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not fsync {path}: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not link {path} into place: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds {len} bytes, expected {expected}")]
    FileLength {
        path: PathBuf,
        len: u64,
        expected: usize,
    },
    #[error("could not remove {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a key for volume {id} already exists; refusing to replace it")]
    AlreadyExists { id: VolumeId },
    #[error("could not seal the key of volume {id}")]
    Seal { id: VolumeId },
    #[error("sealed key of volume {id} is not in a known format (version {version}, {len} bytes)")]
    SealedFormat {
        id: VolumeId,
        version: u8,
        len: usize,
    },
    #[error("could not unseal the key of volume {id}: wrong key-encryption key, or the sealed key was altered or belongs to another volume")]
    Unseal { id: VolumeId },
    #[error("sealed-key storage failed for volume {id}: {source}")]
    Storage {
        id: VolumeId,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Where volume keys are kept. All methods are idempotent except `insert`,
/// which refuses to replace a key (a replaced key would make a volume's data
/// unreadable).
pub trait KeyStore: Send + Sync {
    /// The key of `id`, if one is stored.
    fn load(&self, id: &VolumeId) -> Result<Option<VolumeKey>, KeyError>;

    /// Stores a new key; [`KeyError::AlreadyExists`] if `id` has one.
    fn insert(&self, id: &VolumeId, key: &VolumeKey) -> Result<(), KeyError>;

    /// Destroys the key of `id`; a missing key is `Identity`.
    fn destroy(&self, id: &VolumeId) -> Result<DeleteAction, KeyError>;

    /// The stored key of `id`, or a new one stored now. Two racing callers
    /// end up with the same key.
    fn get_or_create(&self, id: &VolumeId) -> Result<CreateAction<VolumeKey>, KeyError> {
        if let Some(key) = self.load(id)? {
            return Ok(CreateAction::Identity(key));
        }
        let key = VolumeKey::generate()?;
        match self.insert(id, &key) {
            Ok(()) => Ok(CreateAction::Created(key)),
            Err(KeyError::AlreadyExists { .. }) => match self.load(id)? {
                Some(existing) => Ok(CreateAction::Identity(existing)),
                None => Err(KeyError::AlreadyExists { id: id.clone() }),
            },
            Err(other) => Err(other),
        }
    }
}

/// A directory of small secret files, one per volume: the storage under
/// both [`LocalKeyDir`] and [`LocalSealedStorage`].
#[derive(Debug, Clone)]
struct SecretDir {
    path: PathBuf,
    extension: &'static str,
}

/// Refuses a path that grants group or other access or is not ours.
pub(crate) fn check_private(path: &Path, meta: &fs::Metadata) -> Result<(), KeyError> {
    let expected_uid = nix::unistd::geteuid().as_raw();
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 || meta.uid() != expected_uid {
        return Err(KeyError::InsecurePermissions {
            path: path.to_owned(),
            mode,
            uid: meta.uid(),
            expected_uid,
        });
    }
    Ok(())
}

pub(crate) fn sync_dir(path: &Path) -> Result<(), KeyError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(|source| KeyError::Sync {
            path: path.to_owned(),
            source,
        })
}

impl SecretDir {
    /// Opens (creating if missing, mode 0700) and checks the directory.
    fn open(path: impl Into<PathBuf>, extension: &'static str) -> Result<SecretDir, KeyError> {
        let path = path.into();
        match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {
                if let Some(parent) = path.parent() {
                    sync_dir(parent)?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(KeyError::CreateDir { path, source }),
        }
        let meta = fs::symlink_metadata(&path).map_err(|source| KeyError::Inspect {
            path: path.clone(),
            source,
        })?;
        if !meta.file_type().is_dir() {
            return Err(KeyError::NotADirectory { path });
        }
        check_private(&path, &meta)?;
        Ok(SecretDir { path, extension })
    }

    fn file(&self, id: &VolumeId) -> PathBuf {
        // VolumeId is checked: no '/', no "..", no leading '-' or '.'.
        self.path.join(format!("{id}.{}", self.extension))
    }

    fn temp_file(&self, id: &VolumeId) -> PathBuf {
        self.path.join(format!(".{id}.{}.tmp", self.extension))
    }

    /// Where a file goes on its way out: a name `read` never opens.
    fn tombstone(&self, id: &VolumeId) -> PathBuf {
        self.path.join(format!(".{id}.{}.removed", self.extension))
    }

    /// The first step of removal: takes the file's name away (rename to the
    /// tombstone, then fsync the directory), so from here on nothing can
    /// load it. `Identity` when there is no file.
    fn retire(&self, id: &VolumeId) -> Result<DeleteAction, KeyError> {
        let path = self.file(id);
        let tombstone = self.tombstone(id);
        match fs::rename(&path, &tombstone) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DeleteAction::Identity),
            Err(source) => return Err(KeyError::Remove { path, source }),
        }
        sync_dir(&self.path)?;
        Ok(DeleteAction::Deleted)
    }

    /// Overwrites (best effort: journaling and flash may keep old blocks,
    /// which is why keys are also sealed or the volume is discarded) and
    /// unlinks a file that has no loadable name any more.
    fn shred(&self, path: &Path) -> Result<(), KeyError> {
        let mut file = match OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(KeyError::Write {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let len = file
            .metadata()
            .map_err(|source| KeyError::Inspect {
                path: path.to_owned(),
                source,
            })?
            .len();
        let zeros = vec![0u8; usize::try_from(len).unwrap_or(0).min(64 * 1024)];
        file.write_all(&zeros)
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::Write {
                path: path.to_owned(),
                source,
            })?;
        drop(file);
        fs::remove_file(path).map_err(|source| KeyError::Remove {
            path: path.to_owned(),
            source,
        })
    }

    fn read(&self, id: &VolumeId, max_len: usize) -> Result<Option<Zeroizing<Vec<u8>>>, KeyError> {
        let path = self.file(id);
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(KeyError::Read { path, source }),
        };
        let meta = file.metadata().map_err(|source| KeyError::Inspect {
            path: path.clone(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(KeyError::NotAFile { path });
        }
        check_private(&path, &meta)?;
        if meta.len() > max_len as u64 {
            return Err(KeyError::FileLength {
                path,
                len: meta.len(),
                expected: max_len,
            });
        }
        // Sized up front so the buffer never reallocates and leaves a copy.
        let mut bytes = Zeroizing::new(Vec::with_capacity(max_len + 1));
        (&mut file)
            .take(max_len as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| KeyError::Read {
                path: path.clone(),
                source,
            })?;
        Ok(Some(bytes))
    }

    /// Writes `bytes` as a new file; never replaces an existing one.
    fn create_new(&self, id: &VolumeId, bytes: &[u8]) -> Result<(), KeyError> {
        let path = self.file(id);
        let temp = self.temp_file(id);
        // A temporary or tombstone left by a crash is ours (the directory
        // is 0700); a tombstone may still hold an old key's bytes.
        match fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(KeyError::Remove { path: temp, source }),
        }
        self.shred(&self.tombstone(id))?;
        let write = |temp: &Path| -> Result<(), KeyError> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(temp)
                .map_err(|source| KeyError::Write {
                    path: temp.to_owned(),
                    source,
                })?;
            file.write_all(bytes).map_err(|source| KeyError::Write {
                path: temp.to_owned(),
                source,
            })?;
            file.sync_all().map_err(|source| KeyError::Sync {
                path: temp.to_owned(),
                source,
            })
        };
        let linked = write(&temp).and_then(|()| {
            // A hard link fails if the name exists, where rename would
            // silently replace another key.
            fs::hard_link(&temp, &path).map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    KeyError::AlreadyExists { id: id.clone() }
                } else {
                    KeyError::Link {
                        path: path.clone(),
                        source,
                    }
                }
            })
        });
        let removed = fs::remove_file(&temp);
        linked?;
        removed.map_err(|source| KeyError::Remove { path: temp, source })?;
        sync_dir(&self.path)
    }

    /// Removes the file: [`SecretDir::retire`], then
    /// [`SecretDir::shred`] of the tombstone (also one left by a crash).
    fn remove(&self, id: &VolumeId) -> Result<DeleteAction, KeyError> {
        let retired = self.retire(id)?;
        self.shred(&self.tombstone(id))?;
        sync_dir(&self.path)?;
        Ok(retired)
    }
}

/// Keys as files in a local directory (`<dir>/<volume id>.key`, raw bytes).
#[derive(Debug, Clone)]
pub struct LocalKeyDir {
    dir: SecretDir,
}

impl LocalKeyDir {
    /// Opens the directory, creating it with mode 0700 if missing. An
    /// existing directory with group/other access or another owner is
    /// refused.
    pub fn open(path: impl Into<PathBuf>) -> Result<LocalKeyDir, KeyError> {
        Ok(LocalKeyDir {
            dir: SecretDir::open(path, "key")?,
        })
    }

    /// The file that holds the key of `id` (for operators and tests).
    pub fn key_path(&self, id: &VolumeId) -> PathBuf {
        self.dir.file(id)
    }
}

impl KeyStore for LocalKeyDir {
    fn load(&self, id: &VolumeId) -> Result<Option<VolumeKey>, KeyError> {
        let Some(bytes) = self.dir.read(id, VOLUME_KEY_BYTES)? else {
            return Ok(None);
        };
        if bytes.len() != VOLUME_KEY_BYTES {
            return Err(KeyError::FileLength {
                path: self.dir.file(id),
                len: bytes.len() as u64,
                expected: VOLUME_KEY_BYTES,
            });
        }
        if all_zero(&bytes) {
            return Err(KeyError::AllZero {
                path: self.dir.file(id),
                len: bytes.len(),
            });
        }
        VolumeKey::from_bytes(&bytes).map(Some)
    }

    fn insert(&self, id: &VolumeId, key: &VolumeKey) -> Result<(), KeyError> {
        self.dir.create_new(id, key.expose_secret())
    }

    fn destroy(&self, id: &VolumeId) -> Result<DeleteAction, KeyError> {
        self.dir.remove(id)
    }
}

/// Keeps sealed (encrypted, authenticated) keys. Implementations need not
/// be secret: a sealed key is useless without the KEK.
pub trait SealedKeyStorage: Send + Sync {
    fn get(&self, id: &VolumeId) -> Result<Option<Vec<u8>>, KeyError>;
    /// Stores new sealed bytes; [`KeyError::AlreadyExists`] if `id` has some.
    fn put_new(&self, id: &VolumeId, sealed: &[u8]) -> Result<(), KeyError>;
    fn remove(&self, id: &VolumeId) -> Result<DeleteAction, KeyError>;
}

/// Sealed keys as files (`<dir>/<volume id>.sealed`), written like
/// [`LocalKeyDir`]'s.
#[derive(Debug, Clone)]
pub struct LocalSealedStorage {
    dir: SecretDir,
}

impl LocalSealedStorage {
    pub fn open(path: impl Into<PathBuf>) -> Result<LocalSealedStorage, KeyError> {
        Ok(LocalSealedStorage {
            dir: SecretDir::open(path, "sealed")?,
        })
    }

    pub fn sealed_path(&self, id: &VolumeId) -> PathBuf {
        self.dir.file(id)
    }
}

impl SealedKeyStorage for LocalSealedStorage {
    fn get(&self, id: &VolumeId) -> Result<Option<Vec<u8>>, KeyError> {
        Ok(self
            .dir
            .read(id, SEALED_LEN)?
            .map(|bytes| bytes.as_slice().to_vec()))
    }

    fn put_new(&self, id: &VolumeId, sealed: &[u8]) -> Result<(), KeyError> {
        self.dir.create_new(id, sealed)
    }

    fn remove(&self, id: &VolumeId) -> Result<DeleteAction, KeyError> {
        self.dir.remove(id)
    }
}

/// Reads a secret file of exactly `N` raw bytes into locked memory: no
/// symlink, a regular file, private ([`check_private`]), not all zero.
pub(crate) fn read_private_file<const N: usize>(path: &Path) -> Result<LockedBytes<N>, KeyError> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| KeyError::Inspect {
        path: path.to_owned(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(KeyError::NotAFile {
            path: path.to_owned(),
        });
    }
    check_private(path, &meta)?;
    if meta.len() != N as u64 {
        return Err(KeyError::FileLength {
            path: path.to_owned(),
            len: meta.len(),
            expected: N,
        });
    }
    let mut secret = locked::<N>()?;
    file.read_exact(secret.as_mut_slice())
        .map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
    if all_zero(secret.as_slice()) {
        return Err(KeyError::AllZero {
            path: path.to_owned(),
            len: N,
        });
    }
    Ok(secret)
}

/// The key that seals volume keys. Read from a file of exactly
/// [`KEK_BYTES`] raw bytes that only its owner can read; kept in locked
/// memory.
pub struct KeyEncryptionKey(LockedBytes<KEK_BYTES>);

impl KeyEncryptionKey {
    pub fn from_file(path: &Path) -> Result<KeyEncryptionKey, KeyError> {
        read_private_file(path).map(KeyEncryptionKey)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<KeyEncryptionKey, KeyError> {
        locked_copy("key-encryption key", bytes).map(KeyEncryptionKey)
    }

    /// A fresh random KEK (provisioning and tests).
    pub fn generate() -> Result<KeyEncryptionKey, KeyError> {
        let mut kek = KeyEncryptionKey(locked()?);
        fill_random(kek.0.as_mut_slice())?;
        Ok(kek)
    }

    /// Writes the KEK to a new file, mode 0600 (provisioning and tests).
    pub fn write_new_file(&self, path: &Path) -> Result<(), KeyError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| KeyError::Write {
                path: path.to_owned(),
                source,
            })?;
        file.write_all(self.0.as_slice())
            .and_then(|()| file.sync_all())
            .map_err(|source| KeyError::Write {
                path: path.to_owned(),
                source,
            })
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new_from_slice(self.0.as_slice()).expect("KEK_BYTES is the key size")
    }
}

impl fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyEncryptionKey(<redacted>)")
    }
}

/// Sealed key layout: version, 24-byte random nonce, ciphertext, 16-byte tag.
const SEALED_VERSION: u8 = 1;
const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;
const SEALED_LEN: usize = 1 + NONCE_BYTES + VOLUME_KEY_BYTES + TAG_BYTES;

/// Associated data: binds a sealed key to one volume, so a sealed key copied
/// onto another volume's record does not unseal.
fn associated_data(id: &VolumeId) -> Vec<u8> {
    format!("vmv1-volume-key:{id}").into_bytes()
}

/// Seals `key` for `id` under `kek`. A fresh random nonce each time:
/// XChaCha's 192-bit nonce makes random nonces safe.
pub fn seal(kek: &KeyEncryptionKey, id: &VolumeId, key: &VolumeKey) -> Result<Vec<u8>, KeyError> {
    let mut nonce = [0u8; NONCE_BYTES];
    getrandom::fill(&mut nonce).map_err(|e| KeyError::Random {
        reason: e.to_string(),
    })?;
    let mut buffer = Vec::with_capacity(SEALED_LEN);
    buffer.push(SEALED_VERSION);
    buffer.extend_from_slice(&nonce);
    buffer.extend_from_slice(key.expose_secret());
    let (head, body) = buffer.split_at_mut(1 + NONCE_BYTES);
    let nonce = XNonce::from(<[u8; NONCE_BYTES]>::try_from(&head[1..]).expect("24 bytes"));
    let tag = kek
        .cipher()
        .encrypt_inout_detached(&nonce, &associated_data(id), body.into())
        .map_err(|_| KeyError::Seal { id: id.clone() })?;
    buffer.extend_from_slice(&tag);
    Ok(buffer)
}

/// Unseals what [`seal`] made; fails on a wrong KEK, any altered byte, or
/// another volume's sealed key.
pub fn unseal(kek: &KeyEncryptionKey, id: &VolumeId, sealed: &[u8]) -> Result<VolumeKey, KeyError> {
    if sealed.len() != SEALED_LEN || sealed[0] != SEALED_VERSION {
        return Err(KeyError::SealedFormat {
            id: id.clone(),
            version: sealed.first().copied().unwrap_or(0),
            len: sealed.len(),
        });
    }
    let nonce =
        XNonce::from(<[u8; NONCE_BYTES]>::try_from(&sealed[1..1 + NONCE_BYTES]).expect("24 bytes"));
    let (ciphertext, tag) = sealed[1 + NONCE_BYTES..].split_at(VOLUME_KEY_BYTES);
    // Decrypted in place inside locked memory: the plaintext has no other copy.
    let mut key = VolumeKey(locked()?);
    key.0.as_mut_slice().copy_from_slice(ciphertext);
    let tag = chacha20poly1305::Tag::from(<[u8; TAG_BYTES]>::try_from(tag).expect("16 bytes"));
    kek.cipher()
        .decrypt_inout_detached(
            &nonce,
            &associated_data(id),
            key.0.as_mut_slice().into(),
            &tag,
        )
        .map_err(|_| KeyError::Unseal { id: id.clone() })?;
    if all_zero(key.expose_secret()) {
        return Err(KeyError::Blank {
            what: "unsealed volume key",
        });
    }
    Ok(key)
}

/// Envelope keys: sealed under a KEK, kept by any [`SealedKeyStorage`].
pub struct EnvelopeKeyStore<S> {
    kek: KeyEncryptionKey,
    storage: S,
}

impl<S: SealedKeyStorage> EnvelopeKeyStore<S> {
    pub fn new(kek: KeyEncryptionKey, storage: S) -> EnvelopeKeyStore<S> {
        EnvelopeKeyStore { kek, storage }
    }

    pub fn storage(&self) -> &S {
        &self.storage
    }
}

impl<S> fmt::Debug for EnvelopeKeyStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvelopeKeyStore")
            .field("kek", &self.kek)
            .finish_non_exhaustive()
    }
}

impl<S: SealedKeyStorage> KeyStore for EnvelopeKeyStore<S> {
    fn load(&self, id: &VolumeId) -> Result<Option<VolumeKey>, KeyError> {
        match self.storage.get(id)? {
            Some(sealed) => unseal(&self.kek, id, &sealed).map(Some),
            None => Ok(None),
        }
    }

    fn insert(&self, id: &VolumeId, key: &VolumeKey) -> Result<(), KeyError> {
        let sealed = seal(&self.kek, id, key)?;
        self.storage.put_new(id, &sealed)
    }

    fn destroy(&self, id: &VolumeId) -> Result<DeleteAction, KeyError> {
        self.storage.remove(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    fn id() -> VolumeId {
        VolumeId::generate()
    }

    #[test]
    fn debug_of_keys_is_redacted() {
        let key = VolumeKey::from_bytes(&[0xAB; VOLUME_KEY_BYTES]).unwrap();
        let kek = KeyEncryptionKey::from_bytes(&[0xCD; KEK_BYTES]).unwrap();
        let text = format!("{key:?} {kek:?} {:?}", Some(&key));
        assert_eq!(
            text,
            "VolumeKey(<redacted>) KeyEncryptionKey(<redacted>) Some(VolumeKey(<redacted>))"
        );
        assert!(!text.to_lowercase().contains("ab"));
        let store = EnvelopeKeyStore::new(kek, MemoryStorage::default());
        assert!(!format!("{store:?}").to_lowercase().contains("cd"));
    }

    #[test]
    fn generated_keys_differ_and_have_the_right_size() {
        let a = VolumeKey::generate().unwrap();
        let b = VolumeKey::generate().unwrap();
        assert_eq!(a.expose_secret().len(), VOLUME_KEY_BYTES);
        assert!(!a.same_as(&b));
        assert!(a.same_as(&VolumeKey::from_bytes(a.expose_secret()).unwrap()));
        assert!(VolumeKey::from_bytes(&[0; 32]).is_err());
    }

    #[test]
    fn seal_unseal_round_trip_and_reveal_nothing() {
        let kek = KeyEncryptionKey::generate().unwrap();
        let key = VolumeKey::generate().unwrap();
        let vol = id();
        let sealed = seal(&kek, &vol, &key).unwrap();
        assert_eq!(sealed.len(), SEALED_LEN);
        assert!(!sealed
            .windows(16)
            .any(|w| key.expose_secret().windows(16).any(|k| k == w)));
        // Fresh nonce each time: sealing twice differs.
        assert_ne!(sealed, seal(&kek, &vol, &key).unwrap());
        assert!(unseal(&kek, &vol, &sealed).unwrap().same_as(&key));
    }

    #[test]
    fn tampered_sealed_keys_are_rejected() {
        let kek = KeyEncryptionKey::generate().unwrap();
        let key = VolumeKey::generate().unwrap();
        let vol = id();
        let sealed = seal(&kek, &vol, &key).unwrap();
        for position in [1, 1 + NONCE_BYTES, 1 + NONCE_BYTES + 10, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[position] ^= 0x01;
            assert!(
                matches!(unseal(&kek, &vol, &bad), Err(KeyError::Unseal { .. })),
                "flipped byte {position} accepted"
            );
        }
        let mut bad_version = sealed.clone();
        bad_version[0] = 9;
        assert!(matches!(
            unseal(&kek, &vol, &bad_version),
            Err(KeyError::SealedFormat { version: 9, .. })
        ));
        assert!(matches!(
            unseal(&kek, &vol, &sealed[..sealed.len() - 1]),
            Err(KeyError::SealedFormat { .. })
        ));
    }

    #[test]
    fn wrong_kek_and_wrong_volume_are_rejected() {
        let kek = KeyEncryptionKey::generate().unwrap();
        let other_kek = KeyEncryptionKey::generate().unwrap();
        let key = VolumeKey::generate().unwrap();
        let vol = id();
        let sealed = seal(&kek, &vol, &key).unwrap();
        let err = unseal(&other_kek, &vol, &sealed).unwrap_err();
        assert!(matches!(err, KeyError::Unseal { .. }));
        assert!(
            err.to_string().contains("wrong key-encryption key"),
            "{err}"
        );
        assert!(matches!(
            unseal(&kek, &id(), &sealed),
            Err(KeyError::Unseal { .. })
        ));
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn key_dir_is_private_and_files_are_0600() {
        let root = tempfile::tempdir().unwrap();
        let dir_path = root.path().join("keys");
        let store = LocalKeyDir::open(&dir_path).unwrap();
        assert_eq!(mode_of(&dir_path), 0o700);
        let vol = id();
        let created = store.get_or_create(&vol).unwrap();
        assert!(created.changed());
        let key_path = store.key_path(&vol);
        assert_eq!(mode_of(&key_path), 0o600);
        assert_eq!(
            fs::read(&key_path).unwrap(),
            created.inner().expose_secret()
        );
        // No temporary left behind.
        let names: Vec<_> = fs::read_dir(&dir_path)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // Idempotent: the same key comes back.
        let again = store.get_or_create(&vol).unwrap();
        assert!(!again.changed());
        assert!(again.inner().same_as(created.inner()));
    }

    #[test]
    fn insecure_key_dirs_and_files_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir_path = root.path().join("keys");
        fs::create_dir(&dir_path).unwrap();
        fs::set_permissions(&dir_path, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(matches!(
            LocalKeyDir::open(&dir_path),
            Err(KeyError::InsecurePermissions { mode: 0o755, .. })
        ));
        fs::set_permissions(&dir_path, fs::Permissions::from_mode(0o700)).unwrap();
        let store = LocalKeyDir::open(&dir_path).unwrap();
        let vol = id();
        let _ = store.get_or_create(&vol).unwrap();
        fs::set_permissions(store.key_path(&vol), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            store.load(&vol),
            Err(KeyError::InsecurePermissions { .. })
        ));
        // A symlinked key directory is refused.
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&dir_path, &link).unwrap();
        assert!(matches!(
            LocalKeyDir::open(&link),
            Err(KeyError::NotADirectory { .. })
        ));
    }

    #[test]
    fn insert_never_replaces_and_crash_leftovers_are_cleared() {
        let root = tempfile::tempdir().unwrap();
        let store = LocalKeyDir::open(root.path().join("k")).unwrap();
        let vol = id();
        let first = VolumeKey::generate().unwrap();
        // A temporary from a crashed write does not block or leak into the result.
        fs::write(
            root.path().join("k").join(format!(".{vol}.key.tmp")),
            b"partial",
        )
        .unwrap();
        store.insert(&vol, &first).unwrap();
        let second = VolumeKey::generate().unwrap();
        assert!(matches!(
            store.insert(&vol, &second),
            Err(KeyError::AlreadyExists { .. })
        ));
        assert!(store.load(&vol).unwrap().unwrap().same_as(&first));
        // A truncated key file is reported, not used.
        let other = id();
        fs::write(store.key_path(&other), [1u8; 10]).unwrap();
        fs::set_permissions(store.key_path(&other), fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            store.load(&other),
            Err(KeyError::FileLength { len: 10, .. })
        ));
    }

    /// A removal interrupted by a crash used to leave 64 zero bytes at the
    /// key's name, which the next create took as the volume's key.
    #[test]
    fn an_all_zero_or_short_key_file_is_never_used() {
        let root = tempfile::tempdir().unwrap();
        let store = LocalKeyDir::open(root.path().join("k")).unwrap();
        let vol = id();
        let path = store.key_path(&vol);
        fs::write(&path, [0u8; VOLUME_KEY_BYTES]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = store.get_or_create(&vol).unwrap_err();
        assert!(matches!(err, KeyError::AllZero { .. }), "{err}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(matches!(store.load(&vol), Err(KeyError::AllZero { .. })));
        assert!(VolumeKey::from_bytes(&[0u8; VOLUME_KEY_BYTES]).is_err());
        // Left as it is for a person to look at.
        assert_eq!(fs::read(&path).unwrap(), [0u8; VOLUME_KEY_BYTES]);
        fs::write(&path, [7u8; VOLUME_KEY_BYTES - 1]).unwrap();
        assert!(matches!(
            store.get_or_create(&vol),
            Err(KeyError::FileLength { len: 63, .. })
        ));
    }

    /// Removal takes the key's name away first, so no step of it leaves a
    /// loadable file, and a leftover tombstone never blocks a new key.
    #[test]
    fn removal_never_leaves_a_loadable_file() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("k");
        let store = LocalKeyDir::open(&dir).unwrap();
        let vol = id();
        let _ = store.get_or_create(&vol).unwrap();
        // A crash right after the first step of removal: the name is gone.
        let _ = store.dir.retire(&vol).unwrap();
        assert!(!store.key_path(&vol).exists());
        assert!(store.load(&vol).unwrap().is_none());
        // The next removal, or a new key, clears the tombstone.
        assert_eq!(store.destroy(&vol).unwrap(), DeleteAction::Identity);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.is_empty(), "{names:?}");
        let _ = store.get_or_create(&vol).unwrap();
        let _ = store.dir.retire(&vol).unwrap();
        let fresh = store.get_or_create(&vol).unwrap();
        assert!(fresh.changed());
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn destroy_removes_the_key_and_is_idempotent() {
        let root = tempfile::tempdir().unwrap();
        let store = LocalKeyDir::open(root.path().join("k")).unwrap();
        let vol = id();
        let _ = store.get_or_create(&vol).unwrap();
        assert_eq!(store.destroy(&vol).unwrap(), DeleteAction::Deleted);
        assert!(!store.key_path(&vol).exists());
        assert!(store.load(&vol).unwrap().is_none());
        assert_eq!(store.destroy(&vol).unwrap(), DeleteAction::Identity);
    }

    #[test]
    fn envelope_store_keeps_only_sealed_bytes_on_disk() {
        let root = tempfile::tempdir().unwrap();
        let kek_path = root.path().join("kek");
        KeyEncryptionKey::generate()
            .unwrap()
            .write_new_file(&kek_path)
            .unwrap();
        let storage = LocalSealedStorage::open(root.path().join("sealed")).unwrap();
        let store = EnvelopeKeyStore::new(KeyEncryptionKey::from_file(&kek_path).unwrap(), storage);
        let vol = id();
        let key = store.get_or_create(&vol).unwrap().into_inner();
        let on_disk = fs::read(store.storage().sealed_path(&vol)).unwrap();
        assert_eq!(on_disk.len(), SEALED_LEN);
        assert!(!on_disk
            .windows(8)
            .any(|w| key.expose_secret().windows(8).any(|k| k == w)));
        // A second store with the same KEK file reads the same key.
        let reopened = EnvelopeKeyStore::new(
            KeyEncryptionKey::from_file(&kek_path).unwrap(),
            LocalSealedStorage::open(root.path().join("sealed")).unwrap(),
        );
        assert!(reopened.load(&vol).unwrap().unwrap().same_as(&key));
        // Another KEK cannot.
        let stranger = EnvelopeKeyStore::new(
            KeyEncryptionKey::generate().unwrap(),
            LocalSealedStorage::open(root.path().join("sealed")).unwrap(),
        );
        assert!(matches!(stranger.load(&vol), Err(KeyError::Unseal { .. })));
        assert_eq!(store.destroy(&vol).unwrap(), DeleteAction::Deleted);
        assert!(reopened.load(&vol).unwrap().is_none());
    }

    #[test]
    fn kek_files_must_be_private_and_exact() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("kek");
        fs::write(&path, [7u8; KEK_BYTES]).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            KeyEncryptionKey::from_file(&path),
            Err(KeyError::InsecurePermissions { .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(KeyEncryptionKey::from_file(&path).is_ok());
        fs::write(&path, [7u8; 31]).unwrap();
        assert!(matches!(
            KeyEncryptionKey::from_file(&path),
            Err(KeyError::FileLength { len: 31, .. })
        ));
    }

    /// Sealed storage in memory, standing in for the control plane's KV.
    #[derive(Default)]
    struct MemoryStorage(Mutex<BTreeMap<VolumeId, Vec<u8>>>);

    impl SealedKeyStorage for MemoryStorage {
        fn get(&self, id: &VolumeId) -> Result<Option<Vec<u8>>, KeyError> {
            Ok(self.0.lock().unwrap().get(id).cloned())
        }
        fn put_new(&self, id: &VolumeId, sealed: &[u8]) -> Result<(), KeyError> {
            let mut map = self.0.lock().unwrap();
            if map.contains_key(id) {
                return Err(KeyError::AlreadyExists { id: id.clone() });
            }
            map.insert(id.clone(), sealed.to_vec());
            Ok(())
        }
        fn remove(&self, id: &VolumeId) -> Result<DeleteAction, KeyError> {
            Ok(match self.0.lock().unwrap().remove(id) {
                Some(_) => DeleteAction::Deleted,
                None => DeleteAction::Identity,
            })
        }
    }

    #[test]
    fn sealed_keys_cannot_be_swapped_between_volumes_in_storage() {
        let store = EnvelopeKeyStore::new(
            KeyEncryptionKey::generate().unwrap(),
            MemoryStorage::default(),
        );
        let (a, b) = (id(), id());
        let _ = store.get_or_create(&a).unwrap();
        let sealed_a = store.storage().get(&a).unwrap().unwrap();
        store.storage().put_new(&b, &sealed_a).unwrap();
        assert!(matches!(store.load(&b), Err(KeyError::Unseal { .. })));
    }
}

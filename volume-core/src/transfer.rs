//! Handing a migration's secrets from the source host to the destination
//! host through the KV store, which never sees them in plaintext.
//!
//! Each host has a static X25519 key pair ([`HostKeyPair`], 32 raw bytes in
//! a `0600` file) and publishes the public half in its host record. The
//! source's volumed seals one box per end ([`seal_transfer`]): the
//! destination's holds the migration secret (the NBD connection's TLS-PSK)
//! and, with the local key store, the volume's data key; the source's own
//! box holds only the secret (it has the data key already, and needs the
//! secret back after a restart). Each box is an anonymous sealed box:
//!
//! ```text
//! ephemeral X25519 public (32) || nonce (12) || ChaCha20-Poly1305 ciphertext+tag
//! key  = HKDF-SHA256(ikm = X25519(ephemeral, recipient),
//!                    salt = ephemeral public || recipient public,
//!                    info = "vmvol migration transfer v1")
//! AAD  = "vmvol migration transfer v1:<migration id>:<source|destination>"
//! plaintext = has-key flag (1) || secret (32) [|| volume key (64)]
//! ```
//!
//! The AAD binds a box to one migration and one end, so a box copied onto
//! another migration's record, or the destination's box offered as the
//! source's, does not open. Boxes are anonymous: whoever may write
//! `<root>/keys/<migration>` could seal one, so that key's ACL (the source
//! host's volumed only, create-only) is what makes a box the source's.
//!
//! Private keys, the derived box keys and every plaintext live in locked
//! memory ([`crate::locked`]) and are zeroed; the few transient copies the
//! curve and cipher crates make on the stack are zeroed by them on drop.

use crate::actions::CreateAction;
use crate::keys::{
    all_zero, check_private, fill_random, locked, read_private_file, sync_dir, KeyError,
    MigrationSecret, VolumeKey, MIGRATION_SECRET_BYTES, VOLUME_KEY_BYTES,
};
use crate::locked::{LockError, LockedBytes};
use crate::names::MigrationId;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use x25519_dalek::{PublicKey, StaticSecret};

/// Bytes in an X25519 private or public key.
pub const HOST_KEY_BYTES: usize = 32;

/// Names the purpose and version of a box: the HKDF info and the AAD's
/// prefix. A new box format gets a new version here.
const PURPOSE: &str = "vmvol migration transfer v1";
const NONCE_BYTES: usize = 12;
const TAG_BYTES: usize = 16;
/// Plaintext: a flag byte (1 = a volume key follows), the secret, the key.
const FLAG_BYTES: usize = 1;
const PLAINTEXT_MAX: usize = FLAG_BYTES + MIGRATION_SECRET_BYTES + VOLUME_KEY_BYTES;
const HEADER_BYTES: usize = HOST_KEY_BYTES + NONCE_BYTES;

/// This host's X25519 key pair. The private half is kept in locked memory
/// and zeroed on drop; `Debug` shows only the public half.
pub struct HostKeyPair {
    secret: LockedBytes<HOST_KEY_BYTES>,
    public: HostPublicKey,
}

/// A host's X25519 public key, as published (base64) in its host record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPublicKey(pub [u8; HOST_KEY_BYTES]);

/// What one migration hands over. The destination gets both (the key only
/// when the volume keys are kept locally, not under a shared KEK); the
/// source only the secret. `Debug` is redacted by the two secrets' own.
#[derive(Debug)]
pub struct MigrationSecrets {
    pub secret: MigrationSecret,
    pub key: Option<VolumeKey>,
}

/// The value at `<root>/keys/<migration>`: one sealed box per end, each
/// base64 (standard, padded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedTransfer {
    pub destination: String,
    pub source: String,
}

/// Which end of a migration a box is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferEnd {
    Source,
    Destination,
}

impl TransferEnd {
    fn as_str(self) -> &'static str {
        match self {
            TransferEnd::Source => "source",
            TransferEnd::Destination => "destination",
        }
    }
}

impl fmt::Display for TransferEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Failures of the host key file and of sealing or opening a transfer.
/// None carries key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// Reading or checking the host key file, or fsyncing its directory
    /// (the [`KeyError`] names the path).
    #[error("host key: {0}")]
    HostKeyFile(KeyError),
    #[error("could not create the host key's directory {path}: {source}")]
    CreateKeyDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not write a new host key to {path}: {source}")]
    WriteHostKey {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not link the new host key into place at {path}: {source}")]
    LinkHostKey {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not remove the temporary host key file {path}: {source}")]
    RemoveTemporary {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not read random bytes for {what}: {reason}")]
    Random { what: &'static str, reason: String },
    #[error(transparent)]
    LockedMemory(LockError),
    #[error("host public key {text:?} is not base64 of {HOST_KEY_BYTES} bytes: {reason}")]
    PublicKeyFormat { text: String, reason: String },
    #[error("the {end} public key of migration {migration} is a low-order point; refusing to seal to it")]
    WeakPublicKey {
        migration: MigrationId,
        end: TransferEnd,
    },
    #[error("could not seal the {end} box of migration {migration}")]
    Seal {
        migration: MigrationId,
        end: TransferEnd,
    },
    #[error("the {end} box of migration {migration} is not base64: {reason}")]
    BoxEncoding {
        migration: MigrationId,
        end: TransferEnd,
        reason: String,
    },
    #[error("the {end} box of migration {migration} is {len} bytes, not a known box format")]
    BoxFormat {
        migration: MigrationId,
        end: TransferEnd,
        len: usize,
    },
    #[error("the {end} box of migration {migration} has a low-order ephemeral key; refusing it")]
    WeakEphemeralKey {
        migration: MigrationId,
        end: TransferEnd,
    },
    #[error("could not open the {end} box of migration {migration}: not sealed to this host's key, altered, or sealed for another migration or end")]
    Open {
        migration: MigrationId,
        end: TransferEnd,
    },
    #[error("the {end} box of migration {migration} opened but {problem}")]
    Payload {
        migration: MigrationId,
        end: TransferEnd,
        problem: &'static str,
    },
}

fn locked_bytes<const N: usize>() -> Result<LockedBytes<N>, TransferError> {
    locked::<N>().map_err(|e| match e {
        KeyError::LockedMemory(source) => TransferError::LockedMemory(source),
        other => TransferError::HostKeyFile(other),
    })
}

fn random(what: &'static str, buffer: &mut [u8]) -> Result<(), TransferError> {
    fill_random(buffer).map_err(|e| TransferError::Random {
        what,
        reason: match e {
            KeyError::Random { reason } => reason,
            other => other.to_string(),
        },
    })
}

impl HostKeyPair {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> Result<HostKeyPair, TransferError> {
        let mut secret = locked_bytes::<HOST_KEY_BYTES>()?;
        random("a host key", secret.as_mut_slice())?;
        Ok(HostKeyPair::from_locked(secret))
    }

    fn from_locked(secret: LockedBytes<HOST_KEY_BYTES>) -> HostKeyPair {
        let public = HostPublicKey(PublicKey::from(&static_secret(&secret)).to_bytes());
        HostKeyPair { secret, public }
    }

    /// The key pair kept in `path`: 32 raw bytes in a `0600` file (its
    /// parent made `0700` if missing). A new pair is made and written when
    /// there is no file; a file with group/other access or another owner,
    /// a symlink, or one of the wrong length or all zero is refused, never
    /// replaced. Two racing callers end up with the same pair.
    pub fn load_or_create(path: &Path) -> Result<CreateAction<HostKeyPair>, TransferError> {
        match fs::symlink_metadata(path) {
            Ok(_) => return HostKeyPair::load(path).map(CreateAction::Identity),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TransferError::HostKeyFile(KeyError::Inspect {
                    path: path.to_owned(),
                    source,
                }))
            }
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if !dir.exists() {
            fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(dir)
                .map_err(|source| TransferError::CreateKeyDir {
                    path: dir.to_owned(),
                    source,
                })?;
        }
        let pair = HostKeyPair::generate()?;
        match pair.write_new(dir, path) {
            Ok(()) => Ok(CreateAction::Created(pair)),
            // Another process made the file first: use its pair.
            Err(TransferError::LinkHostKey { source, .. })
                if source.kind() == io::ErrorKind::AlreadyExists =>
            {
                HostKeyPair::load(path).map(CreateAction::Identity)
            }
            Err(other) => Err(other),
        }
    }

    fn load(path: &Path) -> Result<HostKeyPair, TransferError> {
        let secret = read_private_file::<HOST_KEY_BYTES>(path).map_err(|e| match e {
            KeyError::LockedMemory(source) => TransferError::LockedMemory(source),
            other => TransferError::HostKeyFile(other),
        })?;
        Ok(HostKeyPair::from_locked(secret))
    }

    /// Writes the private key to a temporary file of this process, then
    /// hard-links it to `path`, which fails if the name exists (where a
    /// rename would replace another key), so `path` is never seen
    /// half-written.
    fn write_new(&self, dir: &Path, path: &Path) -> Result<(), TransferError> {
        let file_name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "host.key".to_owned());
        let temp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
        // A leftover with our pid is from a crashed earlier process: ours.
        match fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(TransferError::RemoveTemporary { path: temp, source }),
        }
        let write = || -> Result<(), TransferError> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&temp)
                .map_err(|source| TransferError::WriteHostKey {
                    path: temp.clone(),
                    source,
                })?;
            file.write_all(self.secret.as_slice())
                .and_then(|()| file.sync_all())
                .map_err(|source| TransferError::WriteHostKey {
                    path: temp.clone(),
                    source,
                })?;
            let meta = file
                .metadata()
                .map_err(|source| TransferError::WriteHostKey {
                    path: temp.clone(),
                    source,
                })?;
            // The umask cannot widen 0600, but a setgid or ACL'd directory
            // could; refuse to publish a key others can read.
            check_private(&temp, &meta).map_err(TransferError::HostKeyFile)
        };
        let linked = write().and_then(|()| {
            fs::hard_link(&temp, path).map_err(|source| TransferError::LinkHostKey {
                path: path.to_owned(),
                source,
            })
        });
        let removed = fs::remove_file(&temp);
        linked?;
        removed.map_err(|source| TransferError::RemoveTemporary { path: temp, source })?;
        sync_dir(dir).map_err(TransferError::HostKeyFile)
    }

    pub fn public_key(&self) -> HostPublicKey {
        self.public
    }
}

impl fmt::Debug for HostKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostKeyPair")
            .field("secret", &format_args!("<redacted>"))
            .field("public", &self.public.to_base64())
            .finish()
    }
}

/// The curve crate's secret for one operation; it zeroes itself on drop.
fn static_secret(secret: &LockedBytes<HOST_KEY_BYTES>) -> StaticSecret {
    let mut bytes = [0u8; HOST_KEY_BYTES];
    bytes.copy_from_slice(secret.as_slice());
    let secret = StaticSecret::from(bytes);
    zeroize::Zeroize::zeroize(&mut bytes);
    secret
}

impl HostPublicKey {
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn from_base64(text: &str) -> Result<HostPublicKey, TransferError> {
        let invalid = |reason: String| TransferError::PublicKeyFormat {
            text: text.chars().take(64).collect(),
            reason,
        };
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|e| invalid(e.to_string()))?;
        let bytes = <[u8; HOST_KEY_BYTES]>::try_from(bytes.as_slice())
            .map_err(|_| invalid(format!("{} bytes", bytes.len())))?;
        Ok(HostPublicKey(bytes))
    }
}

/// Binds a box to one migration and one end.
fn associated_data(migration: &MigrationId, end: TransferEnd) -> Vec<u8> {
    format!("{PURPOSE}:{migration}:{end}").into_bytes()
}

/// The box key: HKDF-SHA256 over the X25519 shared secret, salted with
/// both public keys so it is bound to this ephemeral key and this
/// recipient.
fn box_cipher(
    shared: &x25519_dalek::SharedSecret,
    ephemeral: &[u8; HOST_KEY_BYTES],
    recipient: &[u8; HOST_KEY_BYTES],
) -> Result<ChaCha20Poly1305, TransferError> {
    let mut salt = [0u8; 2 * HOST_KEY_BYTES];
    salt[..HOST_KEY_BYTES].copy_from_slice(ephemeral);
    salt[HOST_KEY_BYTES..].copy_from_slice(recipient);
    let mut key = locked_bytes::<32>()?;
    Hkdf::<Sha256>::new(Some(&salt), shared.as_bytes())
        .expand(PURPOSE.as_bytes(), key.as_mut_slice())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    Ok(ChaCha20Poly1305::new_from_slice(key.as_slice()).expect("32 bytes is the key size"))
}

fn seal_box(
    migration: &MigrationId,
    end: TransferEnd,
    recipient: &HostPublicKey,
    secret: &MigrationSecret,
    key: Option<&VolumeKey>,
) -> Result<String, TransferError> {
    let mut ephemeral_bytes = locked_bytes::<HOST_KEY_BYTES>()?;
    random("an ephemeral key", ephemeral_bytes.as_mut_slice())?;
    let ephemeral = static_secret(&ephemeral_bytes);
    let ephemeral_public = PublicKey::from(&ephemeral).to_bytes();
    let shared = ephemeral.diffie_hellman(&PublicKey::from(recipient.0));
    if !shared.was_contributory() {
        return Err(TransferError::WeakPublicKey {
            migration: migration.clone(),
            end,
        });
    }
    let cipher = box_cipher(&shared, &ephemeral_public, &recipient.0)?;
    let mut nonce = [0u8; NONCE_BYTES];
    random("a nonce", &mut nonce)?;

    // The plaintext is assembled and encrypted in place in locked memory.
    let mut plaintext = locked_bytes::<PLAINTEXT_MAX>()?;
    let buffer = plaintext.as_mut_slice();
    buffer[FLAG_BYTES..FLAG_BYTES + MIGRATION_SECRET_BYTES].copy_from_slice(secret.expose_secret());
    let len = match key {
        Some(key) => {
            buffer[0] = 1;
            buffer[FLAG_BYTES + MIGRATION_SECRET_BYTES..].copy_from_slice(key.expose_secret());
            PLAINTEXT_MAX
        }
        None => FLAG_BYTES + MIGRATION_SECRET_BYTES,
    };
    let tag = cipher
        .encrypt_inout_detached(
            &Nonce::from(nonce),
            &associated_data(migration, end),
            (&mut buffer[..len]).into(),
        )
        .map_err(|_| TransferError::Seal {
            migration: migration.clone(),
            end,
        })?;
    let mut sealed = Vec::with_capacity(HEADER_BYTES + len + TAG_BYTES);
    sealed.extend_from_slice(&ephemeral_public);
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(&buffer[..len]);
    sealed.extend_from_slice(&tag);
    Ok(STANDARD.encode(sealed))
}

/// Seals `secrets` for one migration: the destination's box holds the
/// secret and the key (if any), the source's only the secret.
pub fn seal_transfer(
    migration: &MigrationId,
    secrets: &MigrationSecrets,
    destination: &HostPublicKey,
    source: &HostPublicKey,
) -> Result<SealedTransfer, TransferError> {
    Ok(SealedTransfer {
        destination: seal_box(
            migration,
            TransferEnd::Destination,
            destination,
            &secrets.secret,
            secrets.key.as_ref(),
        )?,
        source: seal_box(
            migration,
            TransferEnd::Source,
            source,
            &secrets.secret,
            None,
        )?,
    })
}

/// Opens `end`'s box of `sealed` with this host's `pair`. Fails on another
/// host's key, any altered byte, or a box sealed for another migration or
/// the other end; a source box that carries a volume key is refused.
pub fn open_transfer(
    migration: &MigrationId,
    sealed: &SealedTransfer,
    end: TransferEnd,
    pair: &HostKeyPair,
) -> Result<MigrationSecrets, TransferError> {
    let text = match end {
        TransferEnd::Source => &sealed.source,
        TransferEnd::Destination => &sealed.destination,
    };
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|e| TransferError::BoxEncoding {
            migration: migration.clone(),
            end,
            reason: e.to_string(),
        })?;
    let body_len = bytes.len().saturating_sub(HEADER_BYTES + TAG_BYTES);
    let known_len = body_len == FLAG_BYTES + MIGRATION_SECRET_BYTES || body_len == PLAINTEXT_MAX;
    if !known_len {
        return Err(TransferError::BoxFormat {
            migration: migration.clone(),
            end,
            len: bytes.len(),
        });
    }
    let (ephemeral_public, rest) = bytes.split_at(HOST_KEY_BYTES);
    let (nonce, rest) = rest.split_at(NONCE_BYTES);
    let (ciphertext, tag) = rest.split_at(body_len);
    let ephemeral_public =
        <[u8; HOST_KEY_BYTES]>::try_from(ephemeral_public).expect("split at 32 bytes");
    let shared = static_secret(&pair.secret).diffie_hellman(&PublicKey::from(ephemeral_public));
    if !shared.was_contributory() {
        return Err(TransferError::WeakEphemeralKey {
            migration: migration.clone(),
            end,
        });
    }
    let cipher = box_cipher(&shared, &ephemeral_public, &pair.public.0)?;
    // Decrypted in place in locked memory: the plaintext has no other copy.
    let mut plaintext = locked_bytes::<PLAINTEXT_MAX>()?;
    let buffer = &mut plaintext.as_mut_slice()[..body_len];
    buffer.copy_from_slice(ciphertext);
    cipher
        .decrypt_inout_detached(
            &Nonce::from(<[u8; NONCE_BYTES]>::try_from(nonce).expect("split at 12 bytes")),
            &associated_data(migration, end),
            (&mut *buffer).into(),
            &Tag::from(<[u8; TAG_BYTES]>::try_from(tag).expect("16 bytes left")),
        )
        .map_err(|_| TransferError::Open {
            migration: migration.clone(),
            end,
        })?;
    let payload = |problem| TransferError::Payload {
        migration: migration.clone(),
        end,
        problem,
    };
    let has_key = match (buffer[0], body_len == PLAINTEXT_MAX) {
        (0, false) => false,
        (1, true) => true,
        _ => return Err(payload("its key flag does not match its length")),
    };
    if has_key && end == TransferEnd::Source {
        return Err(payload(
            "carries a volume key, which the source box never holds",
        ));
    }
    let secret_bytes = &buffer[FLAG_BYTES..FLAG_BYTES + MIGRATION_SECRET_BYTES];
    if all_zero(secret_bytes) {
        return Err(payload("its migration secret is all zero bytes"));
    }
    let secret = MigrationSecret::from_bytes(secret_bytes)
        .map_err(|_| payload("its migration secret is not usable"))?;
    let key = if has_key {
        let key_bytes = &buffer[FLAG_BYTES + MIGRATION_SECRET_BYTES..];
        if all_zero(key_bytes) {
            return Err(payload("its volume key is all zero bytes"));
        }
        Some(
            VolumeKey::from_bytes(key_bytes)
                .map_err(|_| payload("its volume key is not usable"))?,
        )
    } else {
        None
    };
    Ok(MigrationSecrets { secret, key })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn secrets(with_key: bool) -> MigrationSecrets {
        MigrationSecrets {
            secret: MigrationSecret::generate().unwrap(),
            key: with_key.then(|| VolumeKey::generate().unwrap()),
        }
    }

    fn same(a: &MigrationSecrets, b: &MigrationSecrets) -> bool {
        let keys = match (&a.key, &b.key) {
            (Some(x), Some(y)) => x.same_as(y),
            (None, None) => true,
            _ => false,
        };
        a.secret.expose_secret() == b.secret.expose_secret() && keys
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn both_ends_open_their_box() {
        let (source, destination) = (
            HostKeyPair::generate().unwrap(),
            HostKeyPair::generate().unwrap(),
        );
        let migration = MigrationId::generate();
        let handed = secrets(true);
        let sealed = seal_transfer(
            &migration,
            &handed,
            &destination.public_key(),
            &source.public_key(),
        )
        .unwrap();
        let at_destination =
            open_transfer(&migration, &sealed, TransferEnd::Destination, &destination).unwrap();
        assert!(same(&at_destination, &handed));
        let at_source = open_transfer(&migration, &sealed, TransferEnd::Source, &source).unwrap();
        assert_eq!(
            at_source.secret.expose_secret(),
            handed.secret.expose_secret()
        );
        // Without a key (envelope store: both ends unseal it themselves).
        let keyless = secrets(false);
        let sealed = seal_transfer(
            &migration,
            &keyless,
            &destination.public_key(),
            &source.public_key(),
        )
        .unwrap();
        let opened =
            open_transfer(&migration, &sealed, TransferEnd::Destination, &destination).unwrap();
        assert!(same(&opened, &keyless));
        // The JSON in the KV store round-trips.
        let json = serde_json::to_string(&sealed).unwrap();
        assert_eq!(
            serde_json::from_str::<SealedTransfer>(&json).unwrap(),
            sealed
        );
    }

    #[test]
    fn the_source_box_carries_no_volume_key() {
        let (source, destination) = (
            HostKeyPair::generate().unwrap(),
            HostKeyPair::generate().unwrap(),
        );
        let migration = MigrationId::generate();
        let handed = secrets(true);
        let sealed = seal_transfer(
            &migration,
            &handed,
            &destination.public_key(),
            &source.public_key(),
        )
        .unwrap();
        let at_source = open_transfer(&migration, &sealed, TransferEnd::Source, &source).unwrap();
        assert!(at_source.key.is_none());
        let len = |text: &str| STANDARD.decode(text).unwrap().len();
        assert_eq!(
            len(&sealed.source),
            HEADER_BYTES + FLAG_BYTES + MIGRATION_SECRET_BYTES + TAG_BYTES
        );
        assert_eq!(
            len(&sealed.destination),
            HEADER_BYTES + PLAINTEXT_MAX + TAG_BYTES
        );
        // Neither box shows any run of the secrets' bytes.
        for text in [&sealed.source, &sealed.destination] {
            let bytes = STANDARD.decode(text).unwrap();
            for secret in [
                handed.secret.expose_secret(),
                handed.key.as_ref().unwrap().expose_secret(),
            ] {
                assert!(!bytes.windows(8).any(|w| secret.windows(8).any(|s| s == w)));
            }
        }
    }

    #[test]
    fn another_hosts_key_cannot_open_a_box() {
        let (source, destination, stranger) = (
            HostKeyPair::generate().unwrap(),
            HostKeyPair::generate().unwrap(),
            HostKeyPair::generate().unwrap(),
        );
        let migration = MigrationId::generate();
        let sealed = seal_transfer(
            &migration,
            &secrets(true),
            &destination.public_key(),
            &source.public_key(),
        )
        .unwrap();
        for (end, pair) in [
            (TransferEnd::Destination, &stranger),
            (TransferEnd::Destination, &source),
            (TransferEnd::Source, &stranger),
            (TransferEnd::Source, &destination),
        ] {
            let err = open_transfer(&migration, &sealed, end, pair).unwrap_err();
            assert!(matches!(err, TransferError::Open { .. }), "{end}: {err}");
        }
    }

    #[test]
    fn a_box_is_bound_to_its_migration_and_end() {
        let pair = HostKeyPair::generate().unwrap();
        let migration = MigrationId::generate();
        // One host at both ends, so only the AAD tells the boxes apart.
        let sealed = seal_transfer(
            &migration,
            &secrets(true),
            &pair.public_key(),
            &pair.public_key(),
        )
        .unwrap();
        let err = open_transfer(
            &MigrationId::generate(),
            &sealed,
            TransferEnd::Destination,
            &pair,
        )
        .unwrap_err();
        assert!(matches!(err, TransferError::Open { .. }), "{err}");
        assert!(err.to_string().contains("another migration"), "{err}");
        let swapped = SealedTransfer {
            destination: sealed.source.clone(),
            source: sealed.destination.clone(),
        };
        for end in [TransferEnd::Destination, TransferEnd::Source] {
            assert!(matches!(
                open_transfer(&migration, &swapped, end, &pair),
                Err(TransferError::Open { .. })
            ));
        }
    }

    #[test]
    fn tampered_boxes_are_rejected() {
        let (source, destination) = (
            HostKeyPair::generate().unwrap(),
            HostKeyPair::generate().unwrap(),
        );
        let migration = MigrationId::generate();
        let sealed = seal_transfer(
            &migration,
            &secrets(true),
            &destination.public_key(),
            &source.public_key(),
        )
        .unwrap();
        let bytes = STANDARD.decode(&sealed.destination).unwrap();
        for position in [
            0,
            HOST_KEY_BYTES,
            HEADER_BYTES,
            HEADER_BYTES + 40,
            bytes.len() - 1,
        ] {
            let mut bad = bytes.clone();
            bad[position] ^= 0x01;
            let tampered = SealedTransfer {
                destination: STANDARD.encode(&bad),
                ..sealed.clone()
            };
            let err = open_transfer(
                &migration,
                &tampered,
                TransferEnd::Destination,
                &destination,
            )
            .unwrap_err();
            assert!(
                matches!(err, TransferError::Open { .. }),
                "flipped byte {position}: {err}"
            );
        }
        let truncated = SealedTransfer {
            destination: STANDARD.encode(&bytes[..bytes.len() - 1]),
            ..sealed.clone()
        };
        assert!(matches!(
            open_transfer(
                &migration,
                &truncated,
                TransferEnd::Destination,
                &destination
            ),
            Err(TransferError::BoxFormat { .. })
        ));
        let garbled = SealedTransfer {
            destination: "not base64!".to_owned(),
            ..sealed.clone()
        };
        assert!(matches!(
            open_transfer(&migration, &garbled, TransferEnd::Destination, &destination),
            Err(TransferError::BoxEncoding { .. })
        ));
        // An all-zero (low-order) ephemeral key is refused before any DH use.
        let mut low_order = bytes.clone();
        low_order[..HOST_KEY_BYTES].fill(0);
        let low_order = SealedTransfer {
            destination: STANDARD.encode(&low_order),
            ..sealed
        };
        assert!(matches!(
            open_transfer(
                &migration,
                &low_order,
                TransferEnd::Destination,
                &destination
            ),
            Err(TransferError::WeakEphemeralKey { .. })
        ));
    }

    #[test]
    fn sealing_to_a_low_order_public_key_is_refused() {
        let pair = HostKeyPair::generate().unwrap();
        let err = seal_transfer(
            &MigrationId::generate(),
            &secrets(false),
            &HostPublicKey([0; HOST_KEY_BYTES]),
            &pair.public_key(),
        )
        .unwrap_err();
        assert!(matches!(
            err,
            TransferError::WeakPublicKey {
                end: TransferEnd::Destination,
                ..
            }
        ));
    }

    #[test]
    fn load_or_create_makes_a_private_file_and_reloads_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("migration");
        let path = dir.join("host.key");
        let created = HostKeyPair::load_or_create(&path).unwrap();
        assert!(created.changed());
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(mode_of(&dir), 0o700);
        assert_eq!(fs::read(&path).unwrap().len(), HOST_KEY_BYTES);
        let again = HostKeyPair::load_or_create(&path).unwrap();
        assert!(!again.changed());
        assert_eq!(again.inner().public_key(), created.inner().public_key());
        // No temporary left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // The reloaded pair opens what was sealed to the created one.
        let migration = MigrationId::generate();
        let public = created.inner().public_key();
        let sealed = seal_transfer(&migration, &secrets(true), &public, &public).unwrap();
        assert!(
            open_transfer(&migration, &sealed, TransferEnd::Destination, again.inner()).is_ok()
        );
    }

    #[test]
    fn insecure_or_malformed_key_files_are_refused_and_kept() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("host.key");
        let _ = HostKeyPair::load_or_create(&path).unwrap();
        let original = fs::read(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = HostKeyPair::load_or_create(&path).unwrap_err();
        assert!(
            matches!(
                err,
                TransferError::HostKeyFile(KeyError::InsecurePermissions { mode: 0o644, .. })
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert_eq!(fs::read(&path).unwrap(), original, "a refused file is kept");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, [7u8; 31]).unwrap();
        assert!(matches!(
            HostKeyPair::load_or_create(&path),
            Err(TransferError::HostKeyFile(KeyError::FileLength {
                len: 31,
                ..
            }))
        ));
        fs::write(&path, [0u8; HOST_KEY_BYTES]).unwrap();
        assert!(matches!(
            HostKeyPair::load_or_create(&path),
            Err(TransferError::HostKeyFile(KeyError::AllZero { .. }))
        ));
        // A symlink to a good key file is not followed.
        let good = root.path().join("good.key");
        let _ = HostKeyPair::load_or_create(&good).unwrap();
        let link = root.path().join("link.key");
        std::os::unix::fs::symlink(&good, &link).unwrap();
        assert!(matches!(
            HostKeyPair::load_or_create(&link),
            Err(TransferError::HostKeyFile(KeyError::Read { .. }))
        ));
    }

    #[test]
    fn debug_shows_no_key_bytes() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("host.key");
        let pair = HostKeyPair::load_or_create(&path).unwrap().into_inner();
        let private = fs::read(&path).unwrap();
        let handed = secrets(true);
        let text = format!("{pair:?} {handed:?}");
        assert!(text.contains("<redacted>"), "{text}");
        assert!(text.contains(&pair.public_key().to_base64()), "{text}");
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        for secret in [
            private.as_slice(),
            handed.secret.expose_secret(),
            handed.key.as_ref().unwrap().expose_secret(),
        ] {
            assert!(!text.contains(&hex(secret)), "{text}");
            assert!(!text.contains(&STANDARD.encode(secret)), "{text}");
            assert!(!text.contains(&format!("{:?}", &secret[..4])), "{text}");
        }
        assert_eq!(
            format!("{handed:?}"),
            "MigrationSecrets { secret: MigrationSecret(<redacted>), key: Some(VolumeKey(<redacted>)) }"
        );
    }

    #[test]
    fn public_keys_round_trip_through_base64() {
        let public = HostKeyPair::generate().unwrap().public_key();
        let text = public.to_base64();
        assert_eq!(text.len(), 44);
        assert_eq!(HostPublicKey::from_base64(&text).unwrap(), public);
        assert!(matches!(
            HostPublicKey::from_base64("AAAA"),
            Err(TransferError::PublicKeyFormat { .. })
        ));
        assert!(matches!(
            HostPublicKey::from_base64("%%%"),
            Err(TransferError::PublicKeyFormat { .. })
        ));
    }
}

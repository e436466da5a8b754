//! Sealed volume keys in the KV store (`<root>/keys/<volume>`), the storage
//! under volume-core's envelope key store.
//!
//! Only ciphertext reaches the store: [`volume_core::keys::EnvelopeKeyStore`]
//! seals each key under the host's KEK, bound to its volume id, before it
//! calls [`SealedKeyStorage::put_new`].
//!
//! [`VolumeHost`](volume_core::host::VolumeHost) is synchronous and runs on
//! blocking threads (`spawn_blocking`), so these calls block on the daemon's
//! runtime handle. They must not be called from an async task.

use consul_kv::ConsulKv;
use std::time::Duration;
use tokio::runtime::Handle;
use volume_control::layout::Layout;
use volume_core::actions::DeleteAction;
use volume_core::keys::{KeyError, SealedKeyStorage};
use volume_core::names::VolumeId;

/// Sealed keys as KV entries; `put_new` is a create-only CAS, so a key is
/// never replaced.
#[derive(Debug, Clone)]
pub struct ConsulSealedStorage {
    kv: ConsulKv,
    layout: Layout,
    runtime: Handle,
    /// Bound on one call, so a hung store fails the operation (which is
    /// retried) instead of blocking a worker forever.
    timeout: Duration,
}

/// A KV call that did not answer within the storage's bound.
#[derive(Debug, thiserror::Error)]
#[error("no answer from the KV store within {0:?}")]
pub struct StorageTimeout(Duration);

impl ConsulSealedStorage {
    pub fn new(kv: ConsulKv, layout: Layout, runtime: Handle) -> ConsulSealedStorage {
        ConsulSealedStorage {
            kv,
            layout,
            runtime,
            timeout: Duration::from_secs(20),
        }
    }

    fn call<T>(
        &self,
        id: &VolumeId,
        future: impl std::future::Future<Output = Result<T, consul_kv::Error>>,
    ) -> Result<T, KeyError> {
        let storage = |source: Box<dyn std::error::Error + Send + Sync>| KeyError::Storage {
            id: id.clone(),
            source,
        };
        self.runtime
            .block_on(async { tokio::time::timeout(self.timeout, future).await })
            .map_err(|_| storage(Box::new(StorageTimeout(self.timeout))))?
            .map_err(|e| storage(Box::new(e)))
    }
}

impl SealedKeyStorage for ConsulSealedStorage {
    fn get(&self, id: &VolumeId) -> Result<Option<Vec<u8>>, KeyError> {
        let key = self.layout.sealed_key(id);
        let answer = self.call(id, self.kv.get(&key))?;
        Ok(answer.value.map(|pair| pair.value))
    }

    fn put_new(&self, id: &VolumeId, sealed: &[u8]) -> Result<(), KeyError> {
        let key = self.layout.sealed_key(id);
        if self.call(id, self.kv.put_cas(&key, sealed, 0))? {
            Ok(())
        } else {
            Err(KeyError::AlreadyExists { id: id.clone() })
        }
    }

    fn remove(&self, id: &VolumeId) -> Result<DeleteAction, KeyError> {
        let key = self.layout.sealed_key(id);
        let existing = self.call(id, self.kv.get(&key))?;
        let Some(pair) = existing.value else {
            return Ok(DeleteAction::Identity);
        };
        // At the index read: a key re-created meanwhile is not ours to drop.
        if self.call(id, self.kv.delete_cas(&key, pair.modify_index))? {
            Ok(DeleteAction::Deleted)
        } else {
            Ok(DeleteAction::Identity)
        }
    }
}

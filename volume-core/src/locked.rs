//! Memory for secrets: locked into RAM (`mlock`, never written to swap),
//! left out of core dumps (`MADV_DONTDUMP`), and zeroed before it is freed.
//!
//! Why hand-written: the crates that do this either wrap libsodium
//! (`secrets`) or add guard pages and canaries we do not need (`memsec`);
//! what is needed here is one private anonymous mapping per secret, which
//! nix's `mmap`, `mlock` and `madvise` give directly.

use nix::sys::mman::{
    madvise, mlock, mmap_anonymous, munlock, munmap, MapFlags, MmapAdvise, ProtFlags,
};
use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use zeroize::Zeroize;

/// `N` secret bytes in their own locked, undumpable page(s). Starts zeroed.
pub(crate) struct LockedBytes<const N: usize> {
    region: NonNull<c_void>,
    len: NonZeroUsize,
}

// SAFETY: the mapping is owned by this value alone; `&self` only reads and
// `&mut self` is exclusive, so sharing or sending it is like a `Box<[u8; N]>`.
unsafe impl<const N: usize> Send for LockedBytes<N> {}
// SAFETY: as above: no interior mutability.
unsafe impl<const N: usize> Sync for LockedBytes<N> {}

/// Why locked memory could not be had (usually `RLIMIT_MEMLOCK`).
#[derive(Debug, thiserror::Error)]
#[error("could not {step} {len} bytes of memory for a secret: {source}")]
pub struct LockError {
    pub step: &'static str,
    pub len: usize,
    #[source]
    pub source: nix::errno::Errno,
}

fn page_size() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| usize::try_from(size).ok())
        .filter(|size| *size > 0)
        .unwrap_or(4096)
}

impl<const N: usize> LockedBytes<N> {
    pub(crate) fn new() -> Result<LockedBytes<N>, LockError> {
        let page = page_size();
        let len = NonZeroUsize::new(N.div_ceil(page).max(1) * page).expect("at least one page");
        let fail = |step, source| LockError {
            step,
            len: len.get(),
            source,
        };
        // SAFETY: a new private anonymous mapping with no address hint
        // aliases no existing memory.
        let region = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .map_err(|e| fail("map", e))?;
        let bytes = LockedBytes { region, len };
        // SAFETY: `region`/`len` is exactly the mapping made above.
        unsafe { mlock(region, len.get()) }.map_err(|e| fail("lock", e))?;
        // SAFETY: as above; the advice changes no content.
        unsafe { madvise(region, len.get(), MmapAdvise::MADV_DONTDUMP) }
            .map_err(|e| fail("exclude from core dumps", e))?;
        Ok(bytes)
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is at least N bytes, readable, initialised
        // (anonymous mappings start zeroed) and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.region.as_ptr().cast::<u8>(), N) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only
        // reference.
        unsafe { std::slice::from_raw_parts_mut(self.region.as_ptr().cast::<u8>(), N) }
    }
}

impl<const N: usize> Drop for LockedBytes<N> {
    fn drop(&mut self) {
        self.as_mut_slice().zeroize();
        // SAFETY: the mapping made in `new`, unlocked and unmapped once; no
        // reference into it outlives `self`. munlock of a range that was
        // never locked (a failed `new`) is harmless.
        unsafe {
            let _ = munlock(self.region, self.len.get());
            let _ = munmap(self.region, self.len.get());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The region is locked and excluded from core dumps, as the kernel
    /// reports it in /proc/self/smaps.
    #[test]
    fn secrets_are_locked_and_undumpable() {
        let mut secret = LockedBytes::<64>::new().unwrap();
        assert!(secret.as_slice().iter().all(|b| *b == 0));
        secret.as_mut_slice()[0] = 0xA5;
        let address = secret.region.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let contains = |line: &str| {
            let Some((range, _)) = line.split_once(' ') else {
                return false;
            };
            let Some((start, end)) = range.split_once('-') else {
                return false;
            };
            match (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) {
                (Ok(start), Ok(end)) => (start..end).contains(&address),
                _ => false,
            }
        };
        let flags = smaps
            .lines()
            .skip_while(|line| !contains(line))
            .find(|line| line.starts_with("VmFlags"))
            .expect("mapping listed in smaps");
        assert!(flags.split_whitespace().any(|f| f == "lo"), "{flags}");
        assert!(flags.split_whitespace().any(|f| f == "dd"), "{flags}");
        assert_eq!(secret.as_slice()[0], 0xA5);
    }
}

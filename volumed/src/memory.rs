//! The daemon's memory settings, applied at start. LVM locks every
//! anonymous mapping of the process around each device suspend (see
//! `MEMLOCK_SETTINGS` in volume-core's LVM backend), which makes every
//! thread stack and malloc arena resident in full, for good. So both are
//! kept small (measured in README, "Performance": volumed's memory).

/// Stack of every thread volumed starts (the async workers, the blocking
/// pool, the auto-extend thread). They run our Rust code and
/// libcryptsetup's format and open, never LVM (its own thread). Debug
/// builds, whose frames are several times larger, keep the 2 MiB default.
pub const THREAD_STACK: usize = if cfg!(debug_assertions) {
    2 << 20
} else {
    256 << 10
};

/// glibc malloc: one arena (LVM's lock skips the heap, not other arenas),
/// allocations from 64 KiB up mapped on their own and returned on free,
/// and at most 512 KiB of free heap kept at its top. Fixed thresholds also
/// stop glibc from raising them after a large free, which would keep later
/// large buffers in the heap.
const ARENA_MAX: libc::c_int = 1;
const MMAP_THRESHOLD: libc::c_int = 64 << 10;
const TRIM_THRESHOLD: libc::c_int = 512 << 10;

/// How often free heap pages are given back ([`trim`]).
pub const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Gives free pages inside the heap back to the kernel (`malloc_trim`),
/// which the top-of-heap trim cannot reach past a live allocation.
pub fn trim() {
    // SAFETY: malloc_trim takes the allocator's own locks; it only
    // releases pages of free chunks.
    unsafe { libc::malloc_trim(0) };
}

/// Applies the malloc settings. Call first in `main`, before any thread
/// starts. Returns the settings glibc refused (none on glibc).
pub fn tune_allocator() -> Vec<&'static str> {
    let settings = [
        (libc::M_ARENA_MAX, ARENA_MAX, "M_ARENA_MAX"),
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD, "M_TRIM_THRESHOLD"),
    ];
    let mut refused = Vec::new();
    for (param, value, name) in settings {
        // SAFETY: mallopt only changes allocator parameters; it is called
        // before any other thread exists, with documented parameters.
        if unsafe { libc::mallopt(param, value) } != 1 {
            refused.push(name);
        }
    }
    refused
}

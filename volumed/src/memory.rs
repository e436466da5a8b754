//! The daemon's memory settings, applied at start (measured in README,
//! "Performance": volumed's memory). LVM locks none of volumed's memory
//! (`MEMLOCK_SETTINGS` in volume-core's LVM backend) and gives glibc back
//! its mapping of large allocations after `lvm2_init` (its runner), so
//! what stays resident is what the allocator keeps.

/// glibc malloc: one arena (a freed buffer is reused by any thread, not
/// kept in the arena of the thread that freed it), allocations from 64 KiB
/// up mapped on their own and returned on free, and at most 512 KiB of
/// free heap kept at its top. Fixed thresholds also stop glibc from
/// raising them after a large free, which would keep later large buffers
/// in the heap.
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

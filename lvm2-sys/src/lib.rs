//! Raw bindings to liblvm2cmd, the in-process entry point to the LVM2 command
//! set (`lvm2_init`, `lvm2_run`, `lvm2_exit`, `lvm2_log_fn`).
//!
//! liblvm2cmd keeps process-global state; callers must confine every call to
//! one thread. `volume-core`'s LVM backend does exactly that.
#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case)]
#![allow(clippy::all, clippy::undocumented_unsafe_blocks)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels_match_header() {
        assert_eq!(LVM2_LOG_ERROR, 3);
        assert_eq!(LVM2_LOG_PRINT, 4);
        assert_eq!(LVM2_COMMAND_SUCCEEDED, 1);
    }
}

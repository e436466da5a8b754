//! The LVM backend over liblvm2cmd (work in progress by the LVM engineer).

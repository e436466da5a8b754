//! Generates bindings for `lvm2cmd.h` (Debian: liblvm2-dev) and links liblvm2cmd.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rustc-link-lib=dylib=lvm2cmd");

    let bindings = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("lvm2_.*")
        .allowlist_type("lvm2_.*")
        .allowlist_var("LVM2_.*")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .generate()
        .expect("bindgen failed on lvm2cmd.h; is liblvm2-dev installed?");

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("could not write lvm2cmd bindings");
}

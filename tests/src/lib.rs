//! Fixtures for real-kernel tests: a thin pool on a loop device over a
//! sparse file, cleaned up by name prefix before and after each test.
//!
//! These run only where device-mapper exists: inside the micro-VM (the
//! `microvm` runner) or directly as root on a kernel that has it. Set
//! `NO_TEST_CLEAN_UP=1` to keep the devices for inspection.

pub mod bench;
pub mod kv;
pub mod procs;
pub mod stack;

use fixtures::loopdev::{self, LoopDevice};
use std::path::{Path, PathBuf};
use volume_core::backend::lvm::runner::{CommandLine, LvmRunner};
use volume_core::backend::lvm::LvmBackend;
use volume_core::backend::{ThinBackend, ThinPoolSpec};
use volume_core::names::{LvName, VgName};
use volume_core::units::Bytes;

/// Every VG and backing file a test makes starts with this, so cleanup can
/// find exactly the test's leftovers and nothing else.
pub const TEST_PREFIX: &str = "vmv1test";

/// Where backing files live (tmpfs inside the micro-VM).
pub fn scratch_dir() -> PathBuf {
    std::env::var_os("VOLUME_TEST_SCRATCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

pub fn keep_devices() -> bool {
    std::env::var_os("NO_TEST_CLEAN_UP").is_some_and(|v| v == "1")
}

/// A VG + thin pool on one loop device.
pub struct TestPool {
    pub backend: LvmBackend,
    pub vg: VgName,
    runner: LvmRunner,
    // Dropped after the VG is removed (field order is drop order).
    loop_device: Option<LoopDevice>,
}

impl TestPool {
    /// A fresh pool named after `test`: `<TEST_PREFIX>-<test>` on a sparse
    /// file of `backing` bytes, with a thin pool of `pool_data` bytes.
    pub fn new(test: &str, backing: Bytes, pool_data: Bytes) -> TestPool {
        let vg = VgName::new(format!("{TEST_PREFIX}-{test}")).expect("test VG name");
        let runner = LvmRunner::start().expect("start the LVM worker");
        let backing_prefix = scratch_dir().join(format!("{TEST_PREFIX}-{test}"));
        clean_up(&runner, &vg, &backing_prefix);

        let backing_file = backing_prefix.with_extension("img");
        let loop_device = LoopDevice::create_sparse(&backing_file, backing.0).expect("loop device");
        let mut spec = ThinPoolSpec::new(
            vg.clone(),
            LvName::new("pool").expect("pool name"),
            vec![loop_device.device_path().to_owned()],
        )
        .expect("pool spec");
        spec.data_size = Some(pool_data);
        let backend = LvmBackend::start(spec).expect("LVM backend");
        TestPool {
            backend,
            vg,
            runner,
            loop_device: Some(loop_device),
        }
    }

    pub fn loop_path(&self) -> &Path {
        self.loop_device
            .as_ref()
            .expect("present until drop")
            .device_path()
    }

    pub fn spec(&self) -> &ThinPoolSpec {
        self.backend.spec()
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        if keep_devices() {
            eprintln!(
                "NO_TEST_CLEAN_UP=1: keeping VG {} on {}",
                self.vg,
                self.loop_path().display()
            );
            if let Some(device) = self.loop_device.take() {
                std::mem::forget(device);
            }
            return;
        }
        remove_vg(&self.runner, &self.vg);
        // The guard detaches its device and removes its backing file.
        drop(self.loop_device.take());
    }
}

/// Removes what an earlier run of the test left: its VG (all its LVs), its
/// loop devices and its backing file. Quiet when there is nothing.
fn clean_up(runner: &LvmRunner, vg: &VgName, backing_prefix: &Path) {
    remove_vg(runner, vg);
    match loopdev::cleanup_by_prefix(backing_prefix) {
        Ok(detached) => {
            for device in detached {
                eprintln!("cleanup: detached {}", device.display());
            }
        }
        Err(err) => eprintln!("cleanup: {err}"),
    }
    let _ = std::fs::remove_file(backing_prefix.with_extension("img"));
}

fn remove_vg(runner: &LvmRunner, vg: &VgName) {
    if vg_exists(runner, vg) {
        let line = CommandLine::command("vgremove")
            .args(["--force", "--force", vg.as_str()])
            .build()
            .expect("vgremove command line");
        if let Err(err) = runner.run(&line) {
            eprintln!("cleanup: {err}");
        }
    }
}

fn vg_exists(runner: &LvmRunner, vg: &VgName) -> bool {
    let line = CommandLine::command("vgs")
        .args(["--reportformat", "json", "-o", "vg_name", vg.as_str()])
        .build()
        .expect("vgs command line");
    runner.run(&line).is_ok()
}

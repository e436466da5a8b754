//! Times an encrypted 25 GiB ext4 create two ways, side by side, on a real
//! kernel (run it in the micro-VM: `target/debug/microvm --
//! target/debug/bench_create [RUNS]`):
//!
//! * `VolumeHost::create`: liblvm2cmd and libcryptsetup in process, PBKDF2
//!   keyslot, 4K sectors, no dm-crypt workqueues, lazy mkfs.
//! * The naive sequence with each tool's defaults: `lvcreate`, `cryptsetup
//!   luksFormat` (Argon2 with its benchmark), `cryptsetup open`,
//!   `mkfs.ext4`. This side runs the command-line programs, on purpose,
//!   through a bench-only code path below.
//!
//! Prints the median of each, every run, and the ratio.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use volume_core::backend::lvm::LvmBackend;
use volume_core::backend::ThinBackend;
use volume_core::cmd::{self, Program};
use volume_core::host::{Encryption, NewVolume, RealDevices, VolumeHost};
use volume_core::keys::{LocalKeyDir, VolumeKey};
use volume_core::names::{VolumeId, VolumeName};
use volume_core::units::{Bytes, GIB};
use volume_tests::bench::{median, seconds_each};
use volume_tests::TestPool;

const SIZE_GIB: u64 = 25;

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("RUNS must be a number"))
        .unwrap_or(3);
    let pool = TestPool::new("bench", Bytes(4 * GIB), Bytes(3 * GIB));
    let _ = pool.backend.ensure_pool().expect("ensure pool");
    let scratch = tempfile::tempdir().expect("scratch dir");

    let mut ours = Vec::new();
    let mut naive = Vec::new();
    for run in 0..runs {
        ours.push(time_volume_host(&pool, scratch.path()));
        naive.push(naive::time_cli_defaults(&pool, scratch.path(), run));
    }

    let ours_total: Vec<Duration> = ours.clone();
    let naive_total: Vec<Duration> = naive.iter().map(|n| n.total()).collect();
    println!("encrypted {SIZE_GIB} GiB ext4 create, {runs} run(s) each, same pool:");
    println!(
        "  VolumeHost::create       median {:>6.2} s   runs {}",
        median(&ours_total).as_secs_f64(),
        seconds_each(&ours_total, 2)
    );
    println!(
        "  CLI with defaults        median {:>6.2} s   runs {}",
        median(&naive_total).as_secs_f64(),
        seconds_each(&naive_total, 2)
    );
    for (name, pick) in naive::STEP_NAMES.iter().zip(0..) {
        let steps: Vec<Duration> = naive.iter().map(|n| n.steps[pick]).collect();
        println!(
            "    {name:<22} median {:>6.2} s",
            median(&steps).as_secs_f64()
        );
    }
    println!(
        "  ratio (CLI defaults / VolumeHost): {:.1}x",
        median(&naive_total).as_secs_f64() / median(&ours_total).as_secs_f64()
    );
}

/// One `VolumeHost::create` (timed), then delete (not timed).
fn time_volume_host(pool: &TestPool, scratch: &Path) -> Duration {
    let backend = LvmBackend::start(pool.spec().clone()).expect("LVM backend");
    let host = VolumeHost::new(
        Arc::new(backend),
        Arc::new(RealDevices::locate().expect("tools")),
        Arc::new(LocalKeyDir::open(scratch.join("keys")).expect("key dir")),
        Default::default(),
    );
    let spec = NewVolume {
        id: VolumeId::generate(),
        name: VolumeName::new("bench").unwrap(),
        size: Bytes(SIZE_GIB * GIB),
        encryption: Encryption::Luks2,
    };
    let start = Instant::now();
    let created = host.create(&spec).expect("VolumeHost::create");
    let elapsed = start.elapsed();
    assert!(created.changed());
    let _ = host.delete(&spec.id).expect("delete");
    elapsed
}

/// The bench-only path that runs the command-line tools with their
/// defaults. Nothing in the product runs these programs.
mod naive {
    use super::*;

    pub const STEP_NAMES: [&str; 4] = [
        "lvcreate",
        "cryptsetup luksFormat",
        "cryptsetup open",
        "mkfs.ext4",
    ];

    pub struct NaiveRun {
        pub steps: [Duration; 4],
    }

    impl NaiveRun {
        pub fn total(&self) -> Duration {
            self.steps.iter().sum()
        }
    }

    pub fn time_cli_defaults(pool: &TestPool, scratch: &Path, run: usize) -> NaiveRun {
        let dirs: Vec<&Path> = cmd::SYSTEM_DIRS.iter().map(Path::new).collect();
        let [lvcreate, lvremove, cryptsetup, mkfs] =
            cmd::locate_all(["lvcreate", "lvremove", "cryptsetup", "mkfs.ext4"], &dirs)
                .expect("CLI tools");
        // Without udev the device-mapper tools create nodes themselves.
        let udev = std::env::var_os("DM_DISABLE_UDEV");
        let env: Vec<(&str, &OsStr)> = udev
            .as_deref()
            .map(|v| vec![("DM_DISABLE_UDEV", v)])
            .unwrap_or_default();
        let run_timed = |program: &Program, args: &[&OsStr]| {
            let start = Instant::now();
            program
                .run_with_env(args, &env, &[0])
                .unwrap_or_else(|e| panic!("{e}"));
            start.elapsed()
        };

        let vg = pool.vg.as_str();
        let name = format!("naive-bench-{run}");
        let lv_path = format!("/dev/{vg}/{name}");
        let mapping = format!("naive-bench-crypt-{run}");
        let key_file = scratch.join(format!("naive-{run}.key"));
        let key = VolumeKey::generate().expect("key");
        std::fs::write(&key_file, key.expose_secret()).expect("key file");

        let thin_pool = format!("{vg}/{}", pool.spec().pool);
        let size = format!("{SIZE_GIB}G");
        let key_arg = key_file.as_os_str();
        let steps = [
            run_timed(
                &lvcreate,
                &[
                    "-q".as_ref(),
                    "-T".as_ref(),
                    thin_pool.as_ref(),
                    "-V".as_ref(),
                    size.as_ref(),
                    "-n".as_ref(),
                    name.as_ref(),
                ],
            ),
            run_timed(
                &cryptsetup,
                &[
                    "luksFormat".as_ref(),
                    "--type".as_ref(),
                    "luks2".as_ref(),
                    "--batch-mode".as_ref(),
                    "--key-file".as_ref(),
                    key_arg,
                    lv_path.as_ref(),
                ],
            ),
            run_timed(
                &cryptsetup,
                &[
                    "open".as_ref(),
                    "--key-file".as_ref(),
                    key_arg,
                    lv_path.as_ref(),
                    mapping.as_ref(),
                ],
            ),
            run_timed(
                &mkfs,
                &["-q".as_ref(), format!("/dev/mapper/{mapping}").as_ref()],
            ),
        ];
        // Clean up (not timed).
        let _ = run_timed(&cryptsetup, &["close".as_ref(), mapping.as_ref()]);
        let _ = run_timed(&lvremove, &["-q".as_ref(), "-f".as_ref(), lv_path.as_ref()]);
        let _ = std::fs::remove_file(&key_file);
        NaiveRun { steps }
    }
}

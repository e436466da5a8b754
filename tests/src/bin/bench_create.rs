//! Times an encrypted 25 GiB ext4 create three ways, side by side, in one
//! guest on a real kernel (run it in the micro-VM: `target/debug/microvm --
//! target/debug/bench_create [RUNS]`):
//!
//! * `VolumeHost::create`: liblvm2cmd and libcryptsetup in process, PBKDF2
//!   keyslot, 4K sectors, no dm-crypt workqueues, lazy mkfs.
//! * The hand-tuned command-line sequence a script would run with the same
//!   settings: `lvcreate`, `cryptsetup luksFormat --pbkdf pbkdf2
//!   --pbkdf-force-iterations 1000 --sector-size 4096`, `cryptsetup open
//!   --perf-no_read_workqueue --perf-no_write_workqueue`, `mkfs.ext4` with
//!   lazy inode table and journal init.
//! * The same programs with their defaults (Argon2 with its benchmark,
//!   eager mkfs).
//!
//! The two command-line sides run the programs, on purpose, through a
//! bench-only code path below. Prints the median of each, every run, the
//! per-step medians, and the ratios. `BENCH_TRACE=1` also logs every step
//! and LVM command with timestamps, to see where a create's time goes.

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
    if std::env::var_os("BENCH_TRACE").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter("volume_core=debug")
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .with_writer(std::io::stderr)
            .init();
    }
    let pool = TestPool::new("bench", Bytes(4 * GIB), Bytes(3 * GIB));
    let _ = pool.backend.ensure_pool().expect("ensure pool");
    let scratch = tempfile::tempdir().expect("scratch dir");

    // The first thin LV of a new pool costs more than the next ones, and
    // the first run of each program loads it: one untimed run first.
    let _ = time_volume_host(&pool, scratch.path());
    let _ = cli::time_sequence(&pool, scratch.path(), runs, cli::Flags::Tuned);

    let mut ours = Vec::new();
    let mut tuned = Vec::new();
    let mut defaults = Vec::new();
    for run in 0..runs {
        ours.push(time_volume_host(&pool, scratch.path()));
        tuned.push(cli::time_sequence(
            &pool,
            scratch.path(),
            run,
            cli::Flags::Tuned,
        ));
        defaults.push(cli::time_sequence(
            &pool,
            scratch.path(),
            run,
            cli::Flags::Defaults,
        ));
    }

    let tuned_total: Vec<Duration> = tuned.iter().map(|n| n.total()).collect();
    let defaults_total: Vec<Duration> = defaults.iter().map(|n| n.total()).collect();
    println!("encrypted {SIZE_GIB} GiB ext4 create, {runs} run(s) each, same pool, same guest:");
    println!(
        "  VolumeHost::create       median {:>6.2} s   runs {}",
        median(&ours).as_secs_f64(),
        seconds_each(&ours, 2)
    );
    for (label, runs, totals) in [
        ("CLI hand-tuned", &tuned, &tuned_total),
        ("CLI with defaults", &defaults, &defaults_total),
    ] {
        println!(
            "  {label:<24} median {:>6.2} s   runs {}",
            median(totals).as_secs_f64(),
            seconds_each(totals, 2)
        );
        for (name, pick) in cli::STEP_NAMES.iter().zip(0..) {
            let steps: Vec<Duration> = runs.iter().map(|n| n.steps[pick]).collect();
            println!(
                "    {name:<22} median {:>6.2} s",
                median(&steps).as_secs_f64()
            );
        }
    }
    let ours = median(&ours).as_secs_f64();
    println!(
        "  ratio (CLI hand-tuned / VolumeHost): {:.2}x",
        median(&tuned_total).as_secs_f64() / ours
    );
    println!(
        "  ratio (CLI defaults / VolumeHost):   {:.2}x",
        median(&defaults_total).as_secs_f64() / ours
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
    tracing::info!(volume = %spec.id, "VolumeHost::create starts");
    let start = Instant::now();
    let created = host.create(&spec).expect("VolumeHost::create");
    let elapsed = start.elapsed();
    tracing::info!(volume = %spec.id, "VolumeHost::create done");
    assert!(created.changed());
    let _ = host.delete(&spec.id).expect("delete");
    elapsed
}

/// The bench-only path that runs the command-line tools. Nothing in the
/// product runs these programs.
mod cli {
    use super::*;

    pub const STEP_NAMES: [&str; 4] = [
        "lvcreate",
        "cryptsetup luksFormat",
        "cryptsetup open",
        "mkfs.ext4",
    ];

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Flags {
        /// The settings `VolumeHost` uses, as command-line flags.
        Tuned,
        /// Each program's defaults.
        Defaults,
    }

    pub struct CliRun {
        pub steps: [Duration; 4],
    }

    impl CliRun {
        pub fn total(&self) -> Duration {
            self.steps.iter().sum()
        }
    }

    pub fn time_sequence(pool: &TestPool, scratch: &Path, run: usize, flags: Flags) -> CliRun {
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
        let run_timed = |program: &Program, args: &[&str]| {
            let start = Instant::now();
            program
                .run_with_env(args, &env, &[0])
                .unwrap_or_else(|e| panic!("{e}"));
            start.elapsed()
        };

        let vg = pool.vg.as_str();
        let side = match flags {
            Flags::Tuned => "tuned",
            Flags::Defaults => "defaults",
        };
        let name = format!("cli-bench-{side}-{run}");
        let lv_path = format!("/dev/{vg}/{name}");
        let mapping = format!("cli-bench-crypt-{side}-{run}");
        let mapped = format!("/dev/mapper/{mapping}");
        let key_file = scratch.join(format!("cli-{side}-{run}.key"));
        let key = VolumeKey::generate().expect("key");
        std::fs::write(&key_file, key.expose_secret()).expect("key file");
        let key_arg = key_file.to_str().expect("UTF-8 scratch path");

        let thin_pool = format!("{vg}/{}", pool.spec().pool);
        let size = format!("{SIZE_GIB}G");
        let mut format = vec!["luksFormat", "--type", "luks2", "--batch-mode"];
        let mut open = vec!["open"];
        let mut mkfs_args = vec!["-q"];
        if flags == Flags::Tuned {
            format.extend([
                "--cipher",
                "aes-xts-plain64",
                "--key-size",
                "512",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--sector-size",
                "4096",
            ]);
            open.extend(["--perf-no_read_workqueue", "--perf-no_write_workqueue"]);
            mkfs_args.extend([
                "-b",
                "4096",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            ]);
        }
        format.extend(["--key-file", key_arg, &lv_path]);
        open.extend(["--key-file", key_arg, &lv_path, &mapping]);
        mkfs_args.push(&mapped);
        let steps = [
            run_timed(
                &lvcreate,
                &["-q", "-T", &thin_pool, "-V", &size, "-n", &name],
            ),
            run_timed(&cryptsetup, &format),
            run_timed(&cryptsetup, &open),
            run_timed(&mkfs, &mkfs_args),
        ];
        // Clean up (not timed).
        let _ = run_timed(&cryptsetup, &["close", &mapping]);
        let _ = run_timed(&lvremove, &["-q", "-f", &lv_path]);
        let _ = std::fs::remove_file(&key_file);
        CliRun { steps }
    }
}

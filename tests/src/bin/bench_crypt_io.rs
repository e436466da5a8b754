//! dm-crypt I/O through the project's own mapping (`volume_core::crypt`:
//! LUKS2, AES-256-XTS, 4096-byte sectors), with and without dm-crypt's
//! workqueues, against the bare thin LV as the ceiling. Runs fio with
//! direct I/O on the block devices, four jobs per device: 4K random read,
//! 4K random write, 1M sequential read, 1M sequential write.
//!
//! All three devices are one thin LV, written in full first, so every job
//! rewrites provisioned blocks and the thin pool's first-write allocation
//! is not part of any figure. Run in the micro-VM (`scripts/bench-crypt-io`
//! does all of it):
//!
//! ```sh
//! target/debug/microvm -- target/debug/bench_crypt_io [--runtime-secs 10] [--size-mib 256] [--rounds 1]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use volume_core::backend::ThinBackend;
use volume_core::cmd::{self, Program};
use volume_core::crypt::{self, CryptOptions, FormatGuard};
use volume_core::keys::VolumeKey;
use volume_core::names::VolumeId;
use volume_core::units::{Bytes, GIB, MIB};
use volume_tests::TestPool;

/// fio's name, what it does, block size, and whether it reads.
const JOBS: [(&str, &str, &str, bool); 4] = [
    ("4K random read", "randread", "4k", true),
    ("4K random write", "randwrite", "4k", false),
    ("1M sequential read", "read", "1m", true),
    ("1M sequential write", "write", "1m", false),
];

const DEVICES: [&str; 3] = ["bare thin LV", "crypt, workqueues", "crypt, no workqueues"];

struct Args {
    runtime_secs: u64,
    size_mib: u64,
    rounds: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        runtime_secs: 10,
        size_mib: 256,
        rounds: 1,
    };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        let value: u64 = words
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{word} takes a number"));
        match word.as_str() {
            "--runtime-secs" => args.runtime_secs = value,
            "--size-mib" => args.size_mib = value,
            "--rounds" => args.rounds = value as usize,
            other => panic!(
                "unknown argument {other:?}; usage: bench_crypt_io [--runtime-secs S] [--size-mib N] [--rounds N]"
            ),
        }
    }
    args
}

/// One job's result: bandwidth in MiB/s, IOPS, mean completion latency.
#[derive(Debug, Clone, Copy)]
struct Figures {
    mib_s: f64,
    iops: f64,
    clat_us: f64,
}

/// Where the jobs' region starts on the bare LV: past the LUKS2 header,
/// which a later round opens again.
const BARE_OFFSET: &str = "--offset=32M";

fn fio_job(
    fio: &Program,
    device: &Path,
    bare: bool,
    job: (&str, &str, &str, bool),
    args: &Args,
) -> Figures {
    let (_, rw, block, reads) = job;
    let offset = if bare { BARE_OFFSET } else { "--offset=0" };
    let runtime = format!("--runtime={}", args.runtime_secs);
    let size = format!("--size={}M", args.size_mib);
    let filename = format!("--filename={}", device.display());
    let output = fio
        .run(
            [
                "--name=bench",
                filename.as_str(),
                &format!("--rw={rw}"),
                &format!("--bs={block}"),
                size.as_str(),
                runtime.as_str(),
                "--time_based",
                "--direct=1",
                "--ioengine=libaio",
                "--iodepth=16",
                "--numjobs=1",
                "--randrepeat=0",
                "--norandommap",
                offset,
                "--output-format=json",
            ],
            &[0],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("fio's JSON: {e}"));
    let side = &report["jobs"][0][if reads { "read" } else { "write" }];
    Figures {
        mib_s: side["bw_bytes"].as_f64().unwrap_or(0.0) / MIB as f64,
        iops: side["iops"].as_f64().unwrap_or(0.0),
        clat_us: side["clat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0,
    }
}

/// Writes the whole device once (zeros), so later jobs only rewrite.
fn fill(fio: &Program, device: &Path) {
    let filename = format!("--filename={}", device.display());
    fio.run(
        [
            "--name=fill",
            filename.as_str(),
            "--rw=write",
            "--bs=1m",
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=8",
            "--zero_buffers",
        ],
        &[0],
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn run_device(
    fio: &Program,
    device: &Path,
    args: &Args,
    results: &mut BTreeMap<(usize, usize), Vec<Figures>>,
    which: usize,
) {
    for (index, job) in JOBS.iter().enumerate() {
        let figures = fio_job(fio, device, which == 0, *job, args);
        eprintln!(
            "  {:<22} {:<20} {:>8.1} MiB/s {:>8.0} IOPS {:>8.0} us",
            DEVICES[which], job.0, figures.mib_s, figures.iops, figures.clat_us
        );
        results.entry((which, index)).or_default().push(figures);
    }
}

fn main() {
    let args = parse_args();
    let dirs: Vec<&Path> = cmd::SYSTEM_DIRS.iter().map(Path::new).collect();
    let [fio] = cmd::locate_all(["fio"], &dirs).expect("fio (scripts/setup installs it)");
    let pool = TestPool::new("cryptio", Bytes(3 * GIB), Bytes(2 * GIB));
    let _ = pool.backend.ensure_pool().expect("ensure pool");
    let id = VolumeId::generate();
    // The header's 1 MiB + 16 KiB, and the bare jobs' region past it.
    let lv_size = Bytes((args.size_mib + 64) * MIB);
    let thin = pool
        .backend
        .create_thin(&id.lv_name(), lv_size, &[])
        .expect("thin LV")
        .into_inner();
    let lv: PathBuf = thin.device.expect("active thin LV");
    eprintln!("filling {} ({} MiB) once", lv.display(), lv_size.0 / MIB);
    fill(&fio, &lv);
    let key = VolumeKey::generate().expect("volume key");
    let _ = crypt::format(&lv, &id, &key, FormatGuard::RequireBlank).expect("LUKS2 format");
    let flags = |bypass: bool| CryptOptions {
        no_read_workqueue: bypass,
        no_write_workqueue: bypass,
        allow_discards: true,
    };

    let mut results: BTreeMap<(usize, usize), Vec<Figures>> = BTreeMap::new();
    for round in 0..args.rounds {
        eprintln!("round {} of {}", round + 1, args.rounds);
        for (which, bypass) in [(1, false), (2, true)] {
            let mapping = crypt::open(&lv, &id, &key, &flags(bypass))
                .expect("open the mapping")
                .into_inner();
            run_device(&fio, &mapping, &args, &mut results, which);
            let _ = crypt::close(&id).expect("close the mapping");
        }
        run_device(&fio, &lv, &args, &mut results, 0);
    }

    println!(
        "fio, direct I/O, libaio, iodepth 16, {} s per job, {} MiB region, median of {} round(s); MiB/s (IOPS for 4K jobs)",
        args.runtime_secs, args.size_mib, args.rounds
    );
    println!(
        "| job | {} | {} | {} | no-workqueue vs workqueue | no-workqueue vs bare |",
        DEVICES[0], DEVICES[1], DEVICES[2]
    );
    println!("|---|---|---|---|---|---|");
    for (index, job) in JOBS.iter().enumerate() {
        let small = job.2 == "4k";
        let cell = |which: usize| -> (f64, String) {
            let runs = &results[&(which, index)];
            let mut mib: Vec<f64> = runs.iter().map(|f| f.mib_s).collect();
            let mut iops: Vec<f64> = runs.iter().map(|f| f.iops).collect();
            let mut lat: Vec<f64> = runs.iter().map(|f| f.clat_us).collect();
            let (mib, iops, lat) = (median(&mut mib), median(&mut iops), median(&mut lat));
            let text = if small {
                format!("{mib:.1} ({iops:.0} IOPS, {lat:.0} µs)")
            } else {
                format!("{mib:.1} ({lat:.0} µs)")
            };
            (mib, text)
        };
        let (bare, bare_text) = cell(0);
        let (queued, queued_text) = cell(1);
        let (direct, direct_text) = cell(2);
        println!(
            "| {} | {bare_text} | {queued_text} | {direct_text} | {:.2}× | {:.0} % |",
            job.0,
            direct / queued,
            100.0 * direct / bare
        );
    }
}

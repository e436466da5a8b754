//! The demo behind `scripts/demo`: on a real kernel, a ~3 GiB thin pool over
//! a loop device, a 25 GiB thin volume inside it (over-commit), some data
//! written, and the pool's accounting before and after.

use std::io::Write;
use volume_core::backend::ThinBackend;
use volume_core::capacity::CapacityPolicy;
use volume_core::names::VolumeId;
use volume_core::units::{Bytes, GIB, MIB};
use volume_tests::TestPool;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = TestPool::new("demo", Bytes(4 * GIB), Bytes(3 * GIB));
    let status = pool.backend.ensure_pool()?.into_inner();
    println!(
        "pool {}/{} on {}",
        status.vg,
        status.pool,
        pool.loop_path().display()
    );
    println!("  {}", status.usage);

    let policy = CapacityPolicy::default();
    let size = Bytes(25 * GIB);
    let admission = status.usage.admit_new(&policy, size)?;
    let lv = VolumeId::generate().lv_name();
    let volume = pool.backend.create_thin(&lv, size, &[])?.into_inner();
    println!(
        "created thin volume {} of {} in a {} pool (headroom left at ratio {}: {})",
        volume.lv,
        volume.virtual_size,
        status.usage.data_size,
        policy.overcommit,
        admission.headroom_after
    );

    let device = volume.device.ok_or("the new volume has no device node")?;
    let mut file = std::fs::OpenOptions::new().write(true).open(&device)?;
    let chunk = vec![0x5Au8; MIB as usize];
    for _ in 0..300 {
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    println!("wrote 300 MiB to {}", device.display());

    let status = pool.backend.pool_status()?;
    let listed = pool.backend.list_thins()?;
    println!("pool accounting:");
    println!(
        "  data      {} of {} ({})",
        status.usage.data_used,
        status.usage.data_size,
        status.usage.data_percent()
    );
    println!(
        "  metadata  {} of {} ({})",
        status.usage.metadata_used,
        status.usage.metadata_size,
        status.usage.metadata_percent()
    );
    println!(
        "  provisioned {} in {} volume(s), over-commit {:.1}x of pool data",
        status.usage.provisioned,
        status.usage.volume_count,
        status.usage.provisioned.0 as f64 / status.usage.data_size.0 as f64
    );
    for volume in &listed {
        println!(
            "  volume {}  size {}  data {}",
            volume.lv, volume.virtual_size, volume.data_percent
        );
    }
    let next = Bytes(25 * GIB);
    match status.usage.admit_new(&policy, next) {
        Ok(admission) => println!(
            "a second {next} volume would fit; headroom after: {}",
            admission.headroom_after
        ),
        Err(refusal) => println!("a second {next} volume is refused: {refusal}"),
    }
    Ok(())
}

//! The copying layer's device-mapper tables and status: dm-raid raid1 over
//! the network leg (the nbd device, in sync) and the local leg (the new thin
//! LV, rebuilt from it), and the direct `linear` table that replaces it.
//! Pure text in, text out; the ioctls are in [`super::hydrate`].

use crate::hydration::{HydrationProgress, HydrationState, RecoveryRate};
use crate::units::{Bytes, Sectors, MIB, SECTOR_SIZE};
use devicemapper::Device;

/// dm-raid's region (its bitmap's granularity): 2 MiB, LVM's default for
/// raid LVs. A write while a region is out of sync marks the whole region.
pub const REGION: Sectors = Sectors(2 * MIB / SECTOR_SIZE);

/// Each leg's metadata device (dm-raid's superblock and write-intent
/// bitmap): one 4 MiB extent, as LVM gives a raid LV's `_rmeta`.
pub const META_SIZE: Bytes = Bytes(4 * MIB);

/// The network leg's index: the source, in sync from the start.
pub const NETWORK_LEG: usize = 0;
/// The local leg's index: rebuilt from the network leg.
pub const LOCAL_LEG: usize = 1;

/// `dm_raid_superblock.magic` (`DM_RAID_MAGIC`, little-endian at offset 0
/// of a metadata device): the layer was built on this device before.
const RAID_MAGIC: u32 = 0x6452_6D44;

/// One raid1 leg: its metadata and data devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leg {
    pub meta: Device,
    pub data: Device,
}

/// The copying layer's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyTable {
    /// The volume's size: the source's, which the local LV covers.
    pub length: Sectors,
    pub network: Leg,
    pub local: Leg,
    /// Only on the first build (no superblock yet): tells dm-raid that the
    /// local leg holds nothing. Without it a rebuilt layer resumes from the
    /// recovery offset in the local leg's superblock.
    pub rebuild_local: bool,
    pub rate: RecoveryRate,
}

impl CopyTable {
    /// `(start, length, "raid", params)` for `DM::table_load`.
    ///
    /// `write_mostly 0`: reads of copied regions stay local; the network
    /// leg is read only where the local one is not in sync yet.
    /// `max_recovery_rate` (KiB/s) limits the background copy only.
    pub fn target(&self) -> (u64, u64, String, String) {
        let mut params: Vec<String> = vec![
            "0".to_owned(),
            "region_size".to_owned(),
            REGION.0.to_string(),
        ];
        if self.rebuild_local {
            params.extend(["rebuild".to_owned(), LOCAL_LEG.to_string()]);
        }
        params.extend([
            "max_recovery_rate".to_owned(),
            self.rate.kib_per_sec().to_string(),
            "write_mostly".to_owned(),
            NETWORK_LEG.to_string(),
        ]);
        let text = format!(
            "raid1 {} {} 2 {} {} {} {}",
            params.len(),
            params.join(" "),
            self.network.meta,
            self.network.data,
            self.local.meta,
            self.local.data
        );
        (0, self.length.0, "raid".to_owned(), text)
    }
}

/// The two legs named by an active copying-layer table's parameters (its
/// last four words: meta and data of leg 0, then of leg 1).
pub fn parse_legs(params: &str) -> Option<(Leg, Leg)> {
    let words: Vec<&str> = params.split_whitespace().collect();
    if words.first() != Some(&"raid1") || words.len() < 5 || words[words.len() - 5] != "2" {
        return None;
    }
    let device = |word: &str| word.parse::<Device>().ok();
    let [meta0, data0, meta1, data1] = words[words.len() - 4..] else {
        return None;
    };
    Some((
        Leg {
            meta: device(meta0)?,
            data: device(data0)?,
        },
        Leg {
            meta: device(meta1)?,
            data: device(data1)?,
        },
    ))
}

/// The direct table that replaces the copying layer once it is complete.
pub fn linear_target(length: Sectors, local: Device) -> (u64, u64, String, String) {
    (0, length.0, "linear".to_owned(), format!("{local} 0"))
}

/// Whether `first_bytes` (the start of a metadata device) hold a dm-raid
/// superblock.
pub fn has_superblock(first_bytes: &[u8]) -> bool {
    first_bytes
        .get(..4)
        .map(|magic| u32::from_le_bytes([magic[0], magic[1], magic[2], magic[3]]) == RAID_MAGIC)
        .unwrap_or(false)
}

/// A leg's health character in dm-raid's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegHealth {
    /// `A`: alive and in sync.
    InSync,
    /// `a`: alive, being rebuilt.
    Recovering,
    /// `D`: dead (failed).
    Dead,
    /// Anything else (`p`, `-`, a character a later kernel adds): never
    /// read as in sync.
    Other(char),
}

/// What md is doing (dm-raid's `sync_action`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncAction {
    Idle,
    Frozen,
    Resync,
    Recover,
    Other(String),
}

/// The raid target's status line (`dmsetup status` after the target type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaidStatus {
    pub legs: Vec<LegHealth>,
    /// Sectors done by the current sync action, of `total`.
    pub synced: Sectors,
    pub total: Sectors,
    pub action: SyncAction,
}

/// Parses `raid1 2 Aa 33024/262144 recover 0 0 -` (the parameters of a
/// raid target's status; the last two fields, data offset and journal,
/// are absent on older kernels).
pub fn parse_status(params: &str) -> Result<RaidStatus, String> {
    let bad = |why: &str| format!("raid status {params:?}: {why}");
    let mut words = params.split_whitespace();
    match words.next() {
        Some("raid1") => {}
        other => return Err(bad(&format!("raid type {other:?}, expected raid1"))),
    }
    let count: usize = words
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| bad("no device count"))?;
    let health = words.next().ok_or_else(|| bad("no health characters"))?;
    if health.chars().count() != count {
        return Err(bad("health characters do not match the device count"));
    }
    let legs = health
        .chars()
        .map(|c| match c {
            'A' => LegHealth::InSync,
            'a' => LegHealth::Recovering,
            'D' => LegHealth::Dead,
            other => LegHealth::Other(other),
        })
        .collect();
    let (synced, total) = words
        .next()
        .and_then(|ratio| ratio.split_once('/'))
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| bad("no sync ratio"))?;
    let action = match words.next().ok_or_else(|| bad("no sync action"))? {
        "idle" => SyncAction::Idle,
        "frozen" => SyncAction::Frozen,
        "resync" => SyncAction::Resync,
        "recover" => SyncAction::Recover,
        other => SyncAction::Other(other.to_owned()),
    };
    Ok(RaidStatus {
        legs,
        synced: Sectors(synced),
        total: Sectors(total),
        action,
    })
}

impl RaidStatus {
    /// Complete only when every leg is in sync, md is idle and the ratio is
    /// whole: an idle array with a leg still `a` has not started (or was
    /// interrupted), and is not complete.
    pub fn progress(&self) -> HydrationProgress {
        let total = Bytes(self.total.0 * SECTOR_SIZE);
        let all_in_sync = self.legs.iter().all(|leg| *leg == LegHealth::InSync);
        let state = if self.legs.contains(&LegHealth::Dead) {
            HydrationState::Failed
        } else if all_in_sync && self.action == SyncAction::Idle && self.synced == self.total {
            HydrationState::Complete
        } else {
            HydrationState::Copying
        };
        let copied = match state {
            HydrationState::Complete => total,
            // While the local leg is rebuilt the ratio is its recovery
            // offset; before recovery starts it reads 0.
            _ if all_in_sync => total,
            _ => Bytes(self.synced.0.min(self.total.0) * SECTOR_SIZE),
        };
        HydrationProgress {
            copied,
            total,
            state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(major: u32, minor: u32) -> Device {
        Device { major, minor }
    }

    fn table(rebuild_local: bool) -> CopyTable {
        CopyTable {
            length: Sectors(262_144),
            network: Leg {
                meta: dev(254, 3),
                data: dev(43, 0),
            },
            local: Leg {
                meta: dev(254, 4),
                data: dev(254, 2),
            },
            rebuild_local,
            rate: RecoveryRate::from_kib_per_sec(4096).unwrap(),
        }
    }

    #[test]
    fn the_first_table_rebuilds_the_local_leg_and_a_later_one_resumes() {
        // The shape measured in the micro-VM (ARCHITECTURE.md).
        assert_eq!(
            table(true).target(),
            (
                0,
                262_144,
                "raid".to_owned(),
                "raid1 9 0 region_size 4096 rebuild 1 max_recovery_rate 4096 write_mostly 0 \
                 2 254:3 43:0 254:4 254:2"
                    .to_owned()
            )
        );
        assert_eq!(
            table(false).target().3,
            "raid1 7 0 region_size 4096 max_recovery_rate 4096 write_mostly 0 \
             2 254:3 43:0 254:4 254:2"
        );
        assert_eq!(
            linear_target(Sectors(262_144), dev(254, 2)),
            (0, 262_144, "linear".to_owned(), "254:2 0".to_owned())
        );
    }

    #[test]
    fn the_legs_of_a_loaded_table_are_read_back() {
        let loaded = table(false);
        assert_eq!(
            parse_legs(&loaded.target().3),
            Some((loaded.network, loaded.local))
        );
        assert_eq!(parse_legs("254:2 0"), None);
        assert_eq!(parse_legs("raid1 7 0 region_size 4096 x y"), None);
        assert_eq!(parse_legs("raid1 3 0 2 254:3 43:0 254:4 nope"), None);
    }

    #[test]
    fn status_lines_captured_in_the_micro_vm_parse() {
        let copying = parse_status("raid1 2 Aa 33024/262144 recover 0 0 -").unwrap();
        assert_eq!(copying.legs, [LegHealth::InSync, LegHealth::Recovering]);
        assert_eq!(copying.action, SyncAction::Recover);
        let progress = copying.progress();
        assert_eq!(progress.state, HydrationState::Copying);
        assert_eq!(progress.copied, Bytes(33_024 * 512));
        assert_eq!(progress.total, Bytes(262_144 * 512));
        assert_eq!(progress.percent().hundredths(), 1259);

        let done = parse_status("raid1 2 AA 262144/262144 idle 0 0 -").unwrap();
        assert!(done.progress().is_complete());
        // Older kernels end after the mismatch count.
        assert!(parse_status("raid1 2 AA 262144/262144 idle 0")
            .unwrap()
            .progress()
            .is_complete());
    }

    #[test]
    fn only_a_whole_idle_in_sync_array_is_complete() {
        // Not started yet: idle, but the local leg is not in sync.
        let waiting = parse_status("raid1 2 Aa 0/262144 idle 0 0 -").unwrap();
        assert_eq!(waiting.progress().state, HydrationState::Copying);
        assert_eq!(waiting.progress().copied, Bytes::ZERO);
        let frozen = parse_status("raid1 2 Aa 1024/262144 frozen 0 0 -").unwrap();
        assert_eq!(frozen.progress().state, HydrationState::Copying);
        let dead = parse_status("raid1 2 DA 262144/262144 idle 0 0 -").unwrap();
        assert_eq!(dead.progress().state, HydrationState::Failed);
        let odd = parse_status("raid1 2 Ap 262144/262144 idle 0 0 -").unwrap();
        assert_eq!(odd.legs[1], LegHealth::Other('p'));
        assert_eq!(odd.progress().state, HydrationState::Copying);
    }

    #[test]
    fn malformed_status_is_an_error_naming_the_line() {
        for bad in [
            "",
            "raid5 2 AA 1/1 idle 0",
            "raid1 x AA 1/1 idle 0",
            "raid1 3 AA 1/1 idle 0",
            "raid1 2 AA 1-1 idle 0",
            "raid1 2 AA 1/1",
        ] {
            let error = parse_status(bad).unwrap_err();
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
    }

    #[test]
    fn a_superblock_is_recognised_by_its_magic() {
        assert!(has_superblock(&[0x44, 0x6d, 0x52, 0x64, 0, 0]));
        assert!(!has_superblock(&[0; 4096]));
        assert!(!has_superblock(&[0x44, 0x6d]));
    }
}

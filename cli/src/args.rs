//! The command line, as clap parses it.

use clap::{Args, Parser, Subcommand};
use clap_complete::Shell;
use volume_control::layout::DEFAULT_ROOT;
use volume_model::hydration::RecoveryRate;
use volume_model::names::{HostId, Region, SnapshotId, VolumeId, VolumeName};

/// Printed under `--help`: scripts branch on these.
const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  error (the volume's host reported an error, a record is unreadable, ...)
  2  usage: bad arguments, a request that cannot apply (e.g. shrinking),
     or a destroy without --yes when no terminal can confirm it
  3  capacity: no host can take the volume, or its host cannot grow it
  4  timed out waiting for the volume's host (the request stays recorded)
  5  not found: no such volume (or migration)
  6  the KV store is unreachable
  7  the KV store stayed contended: every attempt lost a race; retry

Environment:
  CONSUL_HTTP_ADDR   KV store address (default 127.0.0.1:8500, where the
                     embedded server `volkv` and a local Consul agent listen)
  CONSUL_HTTP_TOKEN  ACL token (or CONSUL_HTTP_TOKEN_FILE); never printed
  CONSUL_HTTP_SSL, CONSUL_CACERT  as for Consul's own tools";

/// Places, creates, lists, extends and destroys thin volumes across hosts.
///
/// volctl only talks to the KV store: it reserves capacity on a host and
/// records what the volume should be; that host's volumed makes it.
#[derive(Debug, Parser)]
#[command(name = "volctl", version, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalArgs {
    /// Root of this manager's keys in the KV store.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_ROOT)]
    pub kv_root: String,

    /// KV store address (overrides CONSUL_HTTP_ADDR), e.g. 127.0.0.1:8500
    /// or https://consul.example:8501.
    #[arg(long, global = true, value_name = "ADDR")]
    pub kv_addr: Option<String>,

    /// Hosts whose last heartbeat is older than this are not placed on.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_ttl: u64,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Place and create volumes; waits until they are ready.
    #[command(after_help = EXIT_CODES_HELP)]
    Create(CreateArgs),
    /// List volumes.
    #[command(after_help = EXIT_CODES_HELP)]
    List(ListArgs),
    /// Show one volume.
    #[command(after_help = EXIT_CODES_HELP)]
    Show(ShowArgs),
    /// Destroy a volume and its data; waits until it is gone.
    #[command(after_help = EXIT_CODES_HELP)]
    Destroy(DestroyArgs),
    /// Grow a volume; waits until its host has grown it.
    #[command(after_help = EXIT_CODES_HELP)]
    Extend(ExtendArgs),
    /// Change a volume's settings (auto-extend); its data is untouched.
    #[command(after_help = EXIT_CODES_HELP)]
    Update(UpdateArgs),
    /// Show each host's pool and what is reserved on it.
    #[command(after_help = EXIT_CODES_HELP)]
    Hosts(HostsArgs),
    /// Take, list and destroy snapshots of a volume.
    #[command(subcommand)]
    Snapshots(SnapshotsCommand),
    /// A new volume from a live one: on its host from a fresh snapshot, or
    /// on another host (--host/--region), usable at once and copied in the
    /// background.
    ///
    /// To another host, only an encrypted volume goes (its blocks cross the
    /// network as ciphertext), and both hosts' volumed must run with
    /// --migration-listen. volctl waits until the new volume is usable, then
    /// shows the copy's progress until it is complete.
    #[command(after_help = EXIT_CODES_HELP)]
    Fork(ForkArgs),
    /// Move a volume to another host: a new volume (new id, same name) usable
    /// at once, copied in the background; the source is destroyed once the
    /// copy is complete.
    ///
    /// Only an encrypted volume moves (its blocks cross the network as
    /// ciphertext), and both hosts' volumed must run with
    /// --migration-listen. volctl waits until the new volume is usable, then
    /// shows the copy's progress until it is complete, then until the source
    /// is destroyed. Stop the source volume's user first: writes made to it
    /// once its host has started the export are not copied.
    #[command(after_help = EXIT_CODES_HELP)]
    Move(MoveArgs),
    /// Cancel a fork or move to another host: the new volume is destroyed,
    /// the source stays; waits until the new volume is gone.
    #[command(after_help = EXIT_CODES_HELP)]
    Cancel(CancelArgs),
    /// Lift a volume's fence (its I/O resumes); waits until its host has.
    #[command(after_help = EXIT_CODES_HELP)]
    Unfence(UnfenceArgs),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
}

/// How long to wait for a host, and whether to.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Return once the request is recorded, without waiting for the host.
    #[arg(long)]
    pub detach: bool,

    /// Give up waiting after this many seconds (exit 4).
    #[arg(long, value_name = "SECS", default_value_t = 300, alias = "wait-timeout",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub struct CreateArgs {
    /// The volume's name; several volumes may share one.
    pub name: VolumeName,

    /// Size in decimal gigabytes (25 = 25,000,000,000 bytes); with
    /// --snapshot-id at least the snapshot's (default: the snapshot's).
    #[arg(long, value_name = "GB", value_parser = clap::value_parser!(u64).range(1..),
          required_unless_present = "snapshot_id")]
    pub size: Option<u64>,

    /// Region to place in, e.g. ewr (with --snapshot-id: the snapshot's).
    #[arg(
        long,
        value_name = "R",
        required_unless_present = "snapshot_id",
        conflicts_with = "snapshot_id"
    )]
    pub region: Option<Region>,

    /// Restore this snapshot into the new volume, on the snapshot's host.
    #[arg(long, value_name = "SNAPSHOT", conflicts_with_all = ["count", "host", "no_encryption", "require_unique_zone"])]
    pub snapshot_id: Option<SnapshotId>,

    /// Store the volume unencrypted (default: LUKS2 with a per-volume key).
    #[arg(long)]
    pub no_encryption: bool,

    /// Create this many volumes of this name, one after another.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub count: u32,

    /// Never put two volumes of this name in the same zone of the region.
    #[arg(long)]
    pub require_unique_zone: bool,

    /// Place on this host (every capacity check still applies).
    #[arg(long, value_name = "H")]
    pub host: Option<HostId>,

    /// Create under this id (vol_ and 16 of a-z 0-9): safe to run again.
    ///
    /// If a volume with this id is already recorded with the same name,
    /// size, region and encryption, no second one is made and volctl waits
    /// for that one (exit 0); recorded with other settings, exit 2 and
    /// nothing changes. Without --id the id is random, but volctl keeps it
    /// across its own retries and, when the store's answer is lost, reads
    /// back whether the volume was recorded; if it cannot tell (exit 6), it
    /// names the id to rerun the command with.
    #[arg(long, value_name = "ID")]
    pub id: Option<VolumeId>,

    /// Print JSON (an array of volumes) instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub auto_extend: AutoExtendArgs,

    #[command(flatten)]
    pub wait: WaitArgs,
}

/// Volume auto-extend: all three settings together, or none.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "Auto-extend (all three together)")]
pub struct AutoExtendArgs {
    /// Grow the volume once this share of it is used, in percent (50-99).
    ///
    /// Usage is the filesystem's own when the VM's agent reports it, else
    /// the share of the volume the pool has allocated (discards lower it).
    #[arg(long, value_name = "PERCENT",
          value_parser = clap::value_parser!(u32).range(50..=99))]
    pub auto_extend_threshold: Option<u32>,

    /// Grow by this many decimal gigabytes each time (at least 1).
    #[arg(long, value_name = "GB", value_parser = clap::value_parser!(u64).range(1..))]
    pub auto_extend_increment: Option<u64>,

    /// Never grow beyond this size, in decimal gigabytes (larger than the
    /// volume's size).
    #[arg(long, value_name = "GB", value_parser = clap::value_parser!(u64).range(1..))]
    pub auto_extend_limit: Option<u64>,
}

impl AutoExtendArgs {
    /// Whether any of the three flags was given.
    pub fn any(&self) -> bool {
        self.auto_extend_threshold.is_some()
            || self.auto_extend_increment.is_some()
            || self.auto_extend_limit.is_some()
    }
}

#[derive(Debug, Clone, Args)]
pub struct UpdateArgs {
    /// The volume's id (vol_...).
    pub id: VolumeId,

    #[command(flatten)]
    pub auto_extend: AutoExtendArgs,

    /// Turn auto-extend off (the volume keeps its size).
    #[arg(long, conflicts_with_all = ["auto_extend_threshold", "auto_extend_increment", "auto_extend_limit"])]
    pub no_auto_extend: bool,

    /// Daily snapshots taken by the volume's host (true or false).
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub scheduled_snapshots: Option<bool>,

    /// Days a scheduled snapshot is kept (1-60).
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u8).range(1..=60))]
    pub snapshot_retention: Option<u8>,

    /// Print JSON (one volume) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only volumes in this region.
    #[arg(long, value_name = "R")]
    pub region: Option<Region>,

    /// Print JSON (an array of volumes) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    /// The volume's id (vol_...).
    pub id: VolumeId,

    /// Print JSON (one volume) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DestroyArgs {
    /// The volume's id (vol_...).
    pub id: VolumeId,

    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,

    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ExtendArgs {
    /// The volume's id (vol_...).
    pub id: VolumeId,

    /// The new size in decimal gigabytes; must be larger than the current.
    #[arg(long, value_name = "GB", value_parser = clap::value_parser!(u64).range(1..))]
    pub size: u64,

    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Clone, Args)]
pub struct UnfenceArgs {
    /// The volume's id (vol_...).
    pub id: VolumeId,

    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Clone, Args)]
pub struct HostsArgs {
    /// Only hosts in this region.
    #[arg(long, value_name = "R")]
    pub region: Option<Region>,

    /// Print JSON (an array of hosts) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    pub shell: Shell,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_names_and_sizes_are_usage_errors() {
        for argv in [
            &[
                "volctl", "create", "Data", "--size", "25", "--region", "ewr",
            ][..],
            &["volctl", "create", "data", "--size", "0", "--region", "ewr"],
            &[
                "volctl", "create", "data", "--size", "25", "--region", "e/wr",
            ],
            &["volctl", "show", "vol_../../x"],
            &[
                "volctl", "create", "data", "--size", "1", "--region", "ewr", "--count", "0",
            ],
            &[
                "volctl",
                "create",
                "data",
                "--size",
                "1",
                "--region",
                "ewr",
                "--auto-extend-threshold",
                "49",
            ],
            &[
                "volctl",
                "update",
                "vol_0123456789abcdef",
                "--auto-extend-threshold",
                "100",
            ],
            &[
                "volctl",
                "update",
                "vol_0123456789abcdef",
                "--auto-extend-increment",
                "0",
            ],
            &[
                "volctl",
                "update",
                "vol_0123456789abcdef",
                "--no-auto-extend",
                "--auto-extend-limit",
                "5",
            ],
        ] {
            let err = Cli::try_parse_from(argv).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{argv:?}");
        }
    }

    #[test]
    fn migrations_need_a_destination_and_a_rate_within_limits() {
        for argv in [
            &["volctl", "move", "vol_0123456789abcdef"][..],
            &[
                "volctl",
                "move",
                "vol_0123456789abcdef",
                "--host",
                "h2",
                "--region",
                "ewr",
            ],
            &["volctl", "fork", "vol_0123456789abcdef", "--rate", "4096"],
            &[
                "volctl",
                "fork",
                "vol_0123456789abcdef",
                "--host",
                "h2",
                "--rate",
                "63",
            ],
            &[
                "volctl",
                "fork",
                "vol_0123456789abcdef",
                "--host",
                "h2",
                "--rate",
                "fast",
            ],
            &[
                "volctl",
                "fork",
                "vol_0123456789abcdef",
                "--host",
                "h2",
                "--name",
                "copy",
            ],
        ] {
            let err = Cli::try_parse_from(argv).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{argv:?}");
        }
        let cli = Cli::try_parse_from([
            "volctl",
            "move",
            "vol_0123456789abcdef",
            "--region",
            "ewr",
            "--rate",
            "64",
            "--wait-timeout",
            "9",
        ])
        .unwrap();
        let Command::Move(args) = cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(args.migration.rate.map(|r| r.kib_per_sec()), Some(64));
        assert_eq!(args.wait.timeout, 9);
        let help = Cli::command()
            .find_subcommand_mut("move")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("default 102400 = 100 MiB/s"), "{help}");
    }

    #[test]
    fn help_documents_exit_codes() {
        let help = Cli::command().render_help().to_string();
        assert!(help.contains("4  timed out waiting"), "{help}");
        assert!(help.contains("CONSUL_HTTP_TOKEN"), "{help}");
    }

    #[test]
    fn create_help_says_how_to_retry_safely() {
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("create")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("--id <ID>"), "{help}");
        assert!(help.contains("no second one is made"), "{help}");
    }
}

#[derive(Debug, Subcommand)]
pub enum SnapshotsCommand {
    /// Take a snapshot of a volume now; waits until it is taken.
    #[command(after_help = EXIT_CODES_HELP)]
    Create(SnapshotCreateArgs),
    /// List a volume's snapshots.
    #[command(after_help = EXIT_CODES_HELP)]
    List(SnapshotListArgs),
    /// Destroy a snapshot; waits until it is gone.
    #[command(after_help = EXIT_CODES_HELP)]
    Destroy(SnapshotDestroyArgs),
}

#[derive(Debug, Clone, Args)]
pub struct SnapshotCreateArgs {
    /// The volume's id (vol_...).
    pub volume: VolumeId,
    /// Print JSON (the snapshot) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SnapshotListArgs {
    /// The volume's id (vol_...).
    pub volume: VolumeId,
    /// Print JSON (an array of snapshots) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SnapshotDestroyArgs {
    /// The snapshot's id (snap_...).
    pub snapshot: SnapshotId,
    /// Print JSON (the snapshot as it was) instead of a line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ForkArgs {
    /// The volume to fork (vol_...).
    pub volume: VolumeId,
    /// The new volume's name (default: the volume's; on the same host only).
    #[arg(long, conflicts_with = "destination")]
    pub name: Option<VolumeName>,
    #[command(flatten)]
    pub destination: DestinationArgs,
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Print JSON instead of a table (same host: an array with the new
    /// volume; another host: the migration and the new volume).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub wait: MigrationWaitArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MoveArgs {
    /// The volume to move (vol_...).
    pub volume: VolumeId,
    #[command(flatten)]
    pub destination: RequiredDestinationArgs,
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Print JSON (the migration and the new volume) instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub wait: MigrationWaitArgs,
}

/// Where a fork goes; neither: a fork on the volume's own host.
#[derive(Debug, Clone, Default, Args)]
#[group(id = "destination", multiple = false)]
pub struct DestinationArgs {
    /// Fork to this host (another than the volume's; every capacity check
    /// applies, as for a create).
    #[arg(long, value_name = "H")]
    pub host: Option<HostId>,
    /// Fork to the host of this region placement picks (as a create does),
    /// never the volume's own.
    #[arg(long, value_name = "R")]
    pub region: Option<Region>,
}

/// Where a move goes: one of the two.
#[derive(Debug, Clone, Args)]
#[group(id = "destination", required = true, multiple = false)]
pub struct RequiredDestinationArgs {
    /// Move to this host (another than the volume's; every capacity check
    /// applies, as for a create).
    #[arg(long, value_name = "H")]
    pub host: Option<HostId>,
    /// Move to the host of this region placement picks (as a create does),
    /// never the volume's own.
    #[arg(long, value_name = "R")]
    pub region: Option<Region>,
}

impl From<&RequiredDestinationArgs> for DestinationArgs {
    fn from(args: &RequiredDestinationArgs) -> DestinationArgs {
        DestinationArgs {
            host: args.host.clone(),
            region: args.region.clone(),
        }
    }
}

/// The background copy's limit when `--rate` is not given: 100 MiB/s.
pub const DEFAULT_RATE_KIB_PER_SEC: u32 = 102_400;

#[derive(Debug, Clone, Args)]
pub struct MigrationArgs {
    /// Limit the background copy to this many KiB/s (at least 64; default
    /// 102400 = 100 MiB/s). Reads the new volume's user makes of blocks not
    /// yet copied are not limited.
    #[arg(long, value_name = "KIB_PER_SEC", requires = "destination", value_parser = parse_rate)]
    pub rate: Option<RecoveryRate>,
}

fn parse_rate(text: &str) -> Result<RecoveryRate, String> {
    let kib: u64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number of KiB/s"))?;
    RecoveryRate::from_kib_per_sec(kib).map_err(|e| e.to_string())
}

/// How long a fork or move to another host is waited for, and whether.
#[derive(Debug, Clone, Args)]
pub struct MigrationWaitArgs {
    /// Return once the migration is recorded, without waiting for the hosts.
    #[arg(long)]
    pub detach: bool,

    /// Give up waiting (exit 4; the request stays recorded) when the new
    /// volume is not usable this many seconds after the request or, on
    /// another host, its copy has not advanced for this long.
    #[arg(long, value_name = "SECS", default_value_t = 300, alias = "wait-timeout",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

impl From<&MigrationWaitArgs> for WaitArgs {
    fn from(args: &MigrationWaitArgs) -> WaitArgs {
        WaitArgs {
            detach: args.detach,
            timeout: args.timeout,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct CancelArgs {
    /// The migration's id (mig_...) or the new volume's id (vol_...).
    #[arg(value_name = "MIGRATION_OR_VOLUME")]
    pub target: String,
    #[command(flatten)]
    pub wait: WaitArgs,
}

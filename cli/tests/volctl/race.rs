//! Racing creates: many `reserve` calls at once over many hosts, then an
//! audit of the books. Shared by the regular test (`in_process.rs`) and
//! the benchmark (`examples/bench_race.rs`), so both run the same code:
//! volctl's own placement and reservation transaction against volkv.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use consul_kv::ConsulKv;
use volctl::reserve::{self, CreateRequest};
use volctl::{CliError, Ctx, Ui};
use volume_control::layout::{HostRecord, Layout, Ledger, VolumeSpec};
use volume_model::capacity::{CapacityPolicy, PoolUsage};
use volume_model::names::{HostId, Region, VolumeId, VolumeName, Zone};
use volume_model::units::Bytes;

pub const VOLUME_SIZE: Bytes = Bytes(1_000_000_000);

/// The simulated fleet and the load put on it.
#[derive(Debug, Clone, Copy)]
pub struct Race {
    pub hosts: usize,
    pub creates: usize,
    /// Volumes of [`VOLUME_SIZE`] each host can take (ratio 10).
    pub slots_per_host: usize,
}

/// How one create ended.
#[derive(Debug)]
pub enum Ended {
    Placed {
        spec: Box<VolumeSpec>,
        attempts: u32,
    },
    NoRoom,
    Contended,
    Failed(String),
}

#[derive(Debug)]
pub struct Outcome {
    pub placed: usize,
    pub no_room: usize,
    pub contended: usize,
    pub failed: Vec<String>,
    /// Transactions sent beyond the first, summed over every placed create.
    pub txn_retries: u64,
    pub most_attempts: u32,
    /// From the first create's start until the last one was placed.
    pub last_placed_after: Duration,
    pub median_create: Duration,
    pub p99_create: Duration,
    /// Hosts whose ledger exceeds their virtual limit.
    pub overcommitted_hosts: Vec<String>,
    /// Reservations that do not match a desired record (either way), and
    /// placed creates whose record is missing or different.
    pub lost_reservations: Vec<String>,
}

/// An empty host of `slots` volumes of [`VOLUME_SIZE`] at ratio 10.
pub fn host_record(index: usize, slots: usize) -> HostRecord {
    let policy = CapacityPolicy::default();
    HostRecord {
        id: HostId::new(format!("h{index:03}")).expect("host id"),
        region: Region::new("ewr").expect("region"),
        zone: Zone::new(format!("ewr-{}", index % 3)).expect("zone"),
        pool: PoolUsage {
            // The limit is ratio × data size: slots × size / 10.
            data_size: Bytes(VOLUME_SIZE.0 * slots as u64 / 10),
            data_used: Bytes::ZERO,
            metadata_size: Bytes(1 << 30),
            metadata_used: Bytes::ZERO,
            provisioned: Bytes::ZERO,
            volume_count: 0,
            health: Default::default(),
        },
        policy,
        heartbeat_ms: volctl::store::now_ms(),
        orphans: vec![],
        owner: None,
        migration: None,
    }
}

/// Publishes the hosts, runs every create at once, and audits the store.
pub async fn run(kv: &ConsulKv, race: Race) -> Outcome {
    let layout = Layout::default();
    let mut records = Vec::new();
    for index in 0..race.hosts {
        let record = host_record(index, race.slots_per_host);
        let key = layout.host_info(&record.id);
        let value = serde_json::to_vec(&record).expect("record JSON");
        assert!(kv.put(&key, &value).await.expect("publish a host"));
        records.push(record);
    }
    let ctx = Ctx {
        kv: kv.clone(),
        layout: layout.clone(),
        heartbeat_ttl: Duration::from_secs(3600),
    };
    let request = CreateRequest {
        name: VolumeName::new("race").expect("name"),
        region: Region::new("ewr").expect("region"),
        size: VOLUME_SIZE,
        encrypted: false,
        require_unique_zone: false,
        pinned_host: None,
        id_from_caller: false,
        auto_extend: None,
        source: None,
    };
    let started = Instant::now();
    let tasks: Vec<_> = (0..race.creates)
        .map(|_| {
            let (ctx, request) = (ctx.clone(), request.clone());
            tokio::spawn(async move {
                let begun = Instant::now();
                let (mut out, mut err) = (Vec::new(), Vec::new());
                let mut ui = Ui::new(&mut out, &mut err);
                let id = VolumeId::generate();
                let ended = match reserve::reserve(&ctx, &request, &id, &mut ui).await {
                    Ok(reserved) => Ended::Placed {
                        spec: Box::new(reserved.spec),
                        attempts: reserved.attempts,
                    },
                    Err(CliError::NoPlacement(_)) => Ended::NoRoom,
                    Err(CliError::Contended { .. }) => Ended::Contended,
                    Err(other) => Ended::Failed(other.to_string()),
                };
                (ended, begun.elapsed(), started.elapsed())
            })
        })
        .collect();
    let mut outcome = Outcome {
        placed: 0,
        no_room: 0,
        contended: 0,
        failed: Vec::new(),
        txn_retries: 0,
        most_attempts: 0,
        last_placed_after: Duration::ZERO,
        median_create: Duration::ZERO,
        p99_create: Duration::ZERO,
        overcommitted_hosts: Vec::new(),
        lost_reservations: Vec::new(),
    };
    let mut placed_specs = Vec::new();
    let mut durations = Vec::new();
    for task in tasks {
        let (ended, took, at) = task.await.expect("create task");
        match ended {
            Ended::Placed { spec, attempts } => {
                outcome.placed += 1;
                outcome.txn_retries += u64::from(attempts.saturating_sub(1));
                outcome.most_attempts = outcome.most_attempts.max(attempts);
                outcome.last_placed_after = outcome.last_placed_after.max(at);
                durations.push(took);
                placed_specs.push(*spec);
            }
            Ended::NoRoom => outcome.no_room += 1,
            Ended::Contended => outcome.contended += 1,
            Ended::Failed(error) => outcome.failed.push(error),
        }
    }
    durations.sort();
    if !durations.is_empty() {
        outcome.median_create = durations[durations.len() / 2];
        outcome.p99_create = durations[(durations.len() * 99 / 100).min(durations.len() - 1)];
    }
    audit(kv, &layout, &records, &placed_specs, &mut outcome).await;
    outcome
}

/// Ledgers against desired records against what the creates were told.
async fn audit(
    kv: &ConsulKv,
    layout: &Layout,
    records: &[HostRecord],
    placed: &[VolumeSpec],
    outcome: &mut Outcome,
) {
    let stored: Vec<VolumeSpec> = kv
        .get_recurse(&layout.desired_root())
        .await
        .expect("read desired records")
        .value
        .iter()
        .map(|pair| serde_json::from_slice(&pair.value).expect("desired record JSON"))
        .collect();
    let by_id: BTreeMap<&VolumeId, &VolumeSpec> = stored.iter().map(|s| (&s.id, s)).collect();
    for spec in placed {
        if by_id.get(&spec.id) != Some(&spec) {
            outcome.lost_reservations.push(format!(
                "{} was placed on {} but its record is not there",
                spec.id, spec.host
            ));
        }
    }
    if stored.len() != placed.len() {
        outcome.lost_reservations.push(format!(
            "{} desired records for {} placed creates",
            stored.len(),
            placed.len()
        ));
    }
    for record in records {
        let on_host: Vec<&VolumeSpec> = stored.iter().filter(|s| s.host == record.id).collect();
        let desired: Bytes = on_host.iter().map(|s| s.size).sum();
        let ledger: Ledger = match kv
            .get(&layout.host_ledger(&record.id))
            .await
            .expect("read a ledger")
            .value
        {
            Some(pair) => serde_json::from_slice(&pair.value).expect("ledger JSON"),
            None => Ledger::default(),
        };
        if ledger.reserved != desired || ledger.volumes as usize != on_host.len() {
            outcome.lost_reservations.push(format!(
                "{}: ledger {} bytes in {} volumes, desired records {} bytes in {}",
                record.id,
                ledger.reserved.0,
                ledger.volumes,
                desired.0,
                on_host.len()
            ));
        }
        let limit = record.pool.virtual_limit(&record.policy);
        if ledger.reserved > limit || desired > limit {
            outcome.overcommitted_hosts.push(format!(
                "{}: {} bytes reserved over a limit of {}",
                record.id,
                ledger.reserved.0.max(desired.0),
                limit.0
            ));
        }
    }
}

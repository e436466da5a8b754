//! A KV server in process, fake hosts, and volctl driven in process.

use std::time::Duration;

use clap::Parser as _;
use consul_kv::{ClientConfig, ConsulKv};
use consul_kv_server::{Server, ServerConfig, ServerHandle};
use volctl::{Cli, CliError, Ui};
use volume_control::layout::{HostRecord, Layout, Ledger, VolumeSpec, VolumeState, VolumeStatus};
use volume_model::capacity::{CapacityPolicy, PoolUsage};
use volume_model::names::{HostId, Region, VolumeId, Zone};
use volume_model::units::{Bytes, Percent};

pub const GB: u64 = 1_000_000_000;

/// A server and a client of it.
pub struct Env {
    pub server: ServerHandle,
    pub store: Store,
}

impl std::ops::Deref for Env {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

/// Reads and writes the records as the other parties would.
pub struct Store {
    pub kv: ConsulKv,
    pub layout: Layout,
}

pub async fn start() -> Env {
    let server = Server::start(ServerConfig::loopback())
        .await
        .expect("server starts");
    let store = Store::new(client(&server.url()));
    Env { server, store }
}

pub fn client(url: &str) -> ConsulKv {
    let config = ClientConfig::new(url)
        .expect("valid address")
        .with_request_timeout(Duration::from_secs(20));
    ConsulKv::new(config).expect("client builds")
}

pub fn now_ms() -> u64 {
    volctl::store::now_ms()
}

/// An empty pool of `data` bytes at ratio 10 with a fresh heartbeat.
pub fn host(id: &str, region: &str, zone: &str, data: u64) -> HostRecord {
    HostRecord {
        id: HostId::new(id).unwrap(),
        region: Region::new(region).unwrap(),
        zone: Zone::new(zone).unwrap(),
        pool: PoolUsage {
            data_size: Bytes(data),
            data_used: Bytes::ZERO,
            metadata_size: Bytes(64 << 20),
            metadata_used: Bytes(1 << 20),
            provisioned: Bytes::ZERO,
            volume_count: 0,
            health: Default::default(),
        },
        policy: CapacityPolicy::default(),
        heartbeat_ms: now_ms(),
        orphans: vec![],
        owner: None,
        migration: None,
    }
}

impl Store {
    pub fn new(kv: ConsulKv) -> Store {
        Store {
            kv,
            layout: Layout::default(),
        }
    }

    pub async fn publish(&self, record: &HostRecord) {
        let key = self.layout.host_info(&record.id);
        assert!(self
            .kv
            .put(&key, &serde_json::to_vec(record).unwrap())
            .await
            .unwrap());
    }

    /// `volctl <argv>` in process: its result, stdout and stderr.
    pub async fn run(&self, argv: &[&str]) -> (Result<(), CliError>, String, String) {
        run_at(self.kv.clone(), argv).await
    }

    pub async fn ledger(&self, host: &str) -> Option<Ledger> {
        let key = self.layout.host_ledger(&HostId::new(host).unwrap());
        let pair = self.kv.get(&key).await.unwrap().value?;
        Some(serde_json::from_slice(&pair.value).unwrap())
    }

    pub async fn specs(&self) -> Vec<VolumeSpec> {
        let entries = self
            .kv
            .get_recurse(&self.layout.desired_root())
            .await
            .unwrap()
            .value;
        entries
            .iter()
            .map(|pair| serde_json::from_slice(&pair.value).unwrap())
            .collect()
    }

    pub async fn spec(&self, id: &str) -> VolumeSpec {
        let specs = self.specs().await;
        specs
            .into_iter()
            .find(|spec| spec.id.as_str() == id)
            .unwrap_or_else(|| panic!("no spec for {id}"))
    }

    /// Writes a status as volumed would.
    pub async fn report(&self, spec: &VolumeSpec, state: VolumeState, error: Option<&str>) {
        let status = VolumeStatus {
            id: spec.id.clone(),
            state,
            device: Some(format!("/dev/mapper/vmv1-crypt-{}", spec.id)),
            size: spec.size,
            data_percent: Percent::from_hundredths(0),
            encrypted: spec.encrypted,
            error: error.map(str::to_owned),
            updated_ms: now_ms(),
            node: None,
            health: Default::default(),
            auto_extend_refused: None,
            fenced: None,
        };
        let key = self.layout.status(&spec.host, &spec.id);
        self.kv
            .put(&key, &serde_json::to_vec(&status).unwrap())
            .await
            .unwrap();
    }
}

pub async fn run_at(kv: ConsulKv, argv: &[&str]) -> (Result<(), CliError>, String, String) {
    run_on_terminal(kv, argv, false, None).await.0
}

/// [`run_at`] as if stderr were a terminal (`terminal`) and an operator
/// gave `answer` to any question; also returns the questions asked.
pub async fn run_on_terminal(
    kv: ConsulKv,
    argv: &[&str],
    terminal: bool,
    answer: Option<bool>,
) -> ((Result<(), CliError>, String, String), Vec<String>) {
    let cli = Cli::try_parse_from(std::iter::once("volctl").chain(argv.iter().copied()))
        .unwrap_or_else(|e| panic!("{argv:?} parses: {e}"));
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut questions = Vec::new();
    let mut operator = |question: &str| {
        questions.push(question.to_owned());
        Ok(answer.unwrap_or(false))
    };
    let result = {
        let mut ui = Ui::new(&mut out, &mut err).with_terminal_progress(terminal);
        if answer.is_some() {
            ui = ui.with_confirm(&mut operator);
        }
        volctl::run(&cli, kv, &mut ui).await
    };
    (
        (
            result,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        ),
        questions,
    )
}

/// The volume ids a `--json` create printed.
pub fn created_ids(stdout: &str) -> Vec<VolumeId> {
    let views: Vec<serde_json::Value> = serde_json::from_str(stdout).expect("create prints JSON");
    views
        .iter()
        .map(|view| VolumeId::new(view["id"].as_str().unwrap()).unwrap())
        .collect()
}

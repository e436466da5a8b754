//! `fork|move --host|--region`, `cancel` and hydration in `show`/`list`,
//! against the in-process server. The tests play both volumeds: they
//! publish host records with a migration endpoint and write the statuses.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use consul_kv::TxnOp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use volctl::{exit, CliError};
use volume_control::layout::{
    HostRecord, Ledger, MigrationEndpoint, VolumeSource, VolumeSpec, VolumeState,
};
use volume_control::migration::{MigrationKind, MigrationSpec, MigrationState, MigrationStatus};
use volume_model::names::{HostId, MigrationId};
use volume_model::units::{Bytes, BytesPerSec, MIB};

use crate::common::{self, host, Env, Store, GB};

/// A host that takes part in migrations.
fn migrating_host(id: &str, region: &str, zone: &str, data: u64) -> HostRecord {
    HostRecord {
        migration: Some(MigrationEndpoint {
            address: "127.0.0.1:10809".parse().unwrap(),
            public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_owned(),
        }),
        ..host(id, region, zone, data)
    }
}

/// h1 (the sources, most room), h2 (with an endpoint) and h3 (more room
/// than h2 but no endpoint) in ewr; o1 in ord.
async fn hosts() -> Env {
    let env = common::start().await;
    env.publish(&migrating_host("h1", "ewr", "a", 10 * GB))
        .await;
    env.publish(&migrating_host("h2", "ewr", "b", 2 * GB)).await;
    env.publish(&host("h3", "ewr", "c", 5 * GB)).await;
    env.publish(&migrating_host("o1", "ord", "a", 5 * GB)).await;
    env
}

/// A 5 GB encrypted volume on `host`, with scheduled snapshots on.
async fn source_on(env: &Env, host: &str) -> String {
    let (result, stdout, stderr) = env
        .run(&[
            "create", "data", "--size", "5", "--region", "ewr", "--host", host, "--detach",
            "--json",
        ])
        .await;
    result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
    let id = common::created_ids(&stdout)[0].to_string();
    let (result, _, stderr) = env
        .run(&["update", &id, "--scheduled-snapshots", "true"])
        .await;
    result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
    id
}

/// Every key under the root and its value.
async fn everything(env: &Store) -> BTreeMap<String, Vec<u8>> {
    env.kv
        .get_recurse("volumes/v1/")
        .await
        .unwrap()
        .value
        .into_iter()
        .map(|pair| (pair.key, pair.value))
        .collect()
}

/// The keys whose value differs between two reads.
fn changed(before: &BTreeMap<String, Vec<u8>>, after: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    let mut keys: Vec<String> = after
        .iter()
        .filter(|(key, value)| before.get(*key) != Some(value))
        .map(|(key, _)| key.clone())
        .collect();
    keys.extend(
        before
            .keys()
            .filter(|key| !after.contains_key(*key))
            .cloned(),
    );
    keys.sort();
    keys
}

async fn migrations(env: &Store) -> Vec<MigrationSpec> {
    let pairs = env
        .kv
        .get_recurse(&env.layout.migrations_prefix())
        .await
        .unwrap()
        .value;
    pairs
        .iter()
        .filter(|pair| env.layout.parse_migration_key(&pair.key).is_some())
        .map(|pair| serde_json::from_slice(&pair.value).unwrap())
        .collect()
}

async fn write_status(env: &Store, host: &HostId, id: &MigrationId, state: MigrationState) {
    let status = MigrationStatus {
        id: id.clone(),
        state,
        updated_ms: common::now_ms(),
    };
    let key = env.layout.migration_status(host, id);
    env.kv
        .put(&key, &serde_json::to_vec(&status).unwrap())
        .await
        .unwrap();
}

fn hydrating(copied_mib: u64) -> MigrationState {
    MigrationState::Hydrating {
        copied: Bytes(copied_mib * MIB),
        total: Bytes(200 * MIB),
        rate: BytesPerSec(3_774_873),
    }
}

/// The one migration a detached `--json` fork or move recorded.
fn recorded(stdout: &str) -> (MigrationId, String) {
    let output: serde_json::Value = serde_json::from_str(stdout).expect("JSON on stdout");
    let id = MigrationId::new(output["migration"]["id"].as_str().unwrap()).unwrap();
    let volume = output["volume"]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        output["migration"]["destination"]["volume"],
        volume.as_str()
    );
    (id, volume)
}

#[tokio::test]
async fn a_fork_writes_the_migration_the_new_volume_and_its_reservation_in_one_txn() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    let source = env.spec(&source_id).await;
    let before = everything(&env).await;
    let (result, stdout, stderr) = env
        .run(&[
            "fork", &source_id, "--host", "h2", "--rate", "4096", "--detach", "--json",
        ])
        .await;
    result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
    let (id, new_id) = recorded(&stdout);
    assert!(stderr.contains(&format!("recorded the fork of {source_id} on h1 to {new_id} on h2 (migration {id}, copy limited to 4096 KiB/s)")), "{stderr}");

    let after = everything(&env).await;
    assert_eq!(
        changed(&before, &after),
        [
            format!("volumes/v1/desired/h2/{new_id}"),
            "volumes/v1/hosts/h2/ledger".to_owned(),
            format!("volumes/v1/migrations/{id}"),
        ],
        "exactly the three records"
    );
    let spec = &migrations(&env).await[0];
    assert_eq!(spec.id, id);
    assert_eq!(spec.kind, MigrationKind::Fork);
    assert_eq!(
        (spec.source.host.as_str(), spec.source.volume.as_str()),
        ("h1", source_id.as_str())
    );
    assert_eq!(
        (
            spec.destination.host.as_str(),
            spec.destination.volume.as_str()
        ),
        ("h2", new_id.as_str())
    );
    assert_eq!(spec.rate.kib_per_sec(), 4096);
    assert!(!spec.cancel);

    let new = env.spec(&new_id).await;
    assert_eq!(
        (&new.name, new.size, new.encrypted, new.snapshots),
        (&source.name, source.size, true, source.snapshots)
    );
    assert!(new.snapshots.enabled, "the schedule is the source's");
    assert_eq!(
        (new.host.as_str(), new.region.as_str(), new.zone.as_str()),
        ("h2", "ewr", "b")
    );
    assert_eq!(
        new.source,
        Some(VolumeSource::Migration {
            id: id.clone(),
            volume: source.id.clone(),
            host: source.host.clone(),
        })
    );
    assert!(!new.destroy);
    assert_eq!(
        env.ledger("h2").await,
        Some(Ledger {
            reserved: Bytes(5 * GB),
            volumes: 1
        })
    );
    // The source and its reservation are untouched.
    assert_eq!(env.spec(&source_id).await, source);
}

#[tokio::test]
async fn the_default_rate_is_100_mib_per_second_and_move_says_move() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    let (result, stdout, _) = env
        .run(&["move", &source_id, "--host", "h2", "--detach", "--json"])
        .await;
    result.unwrap();
    recorded(&stdout);
    let spec = &migrations(&env).await[0];
    assert_eq!(spec.kind, MigrationKind::Move);
    assert_eq!(spec.rate.kib_per_sec(), 102_400);
    // The source stays until the copy is complete.
    assert!(!env.spec(&source_id).await.destroy);
}

#[tokio::test]
async fn region_placement_never_picks_the_source_host_nor_one_without_an_endpoint() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    // h1 has the most room and h3 more than h2: both would win a create.
    // Four fill h2.
    for _ in 0..4 {
        let (result, stdout, stderr) = env
            .run(&["fork", &source_id, "--region", "ewr", "--detach", "--json"])
            .await;
        result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
        let (_, new_id) = recorded(&stdout);
        assert_eq!(env.spec(&new_id).await.host.as_str(), "h2");
    }
    // Another region: its host.
    let (result, stdout, _) = env
        .run(&["fork", &source_id, "--region", "ord", "--detach", "--json"])
        .await;
    result.unwrap();
    let new = env.spec(&recorded(&stdout).1).await;
    assert_eq!(
        (new.host.as_str(), new.region.as_str(), new.zone.as_str()),
        ("o1", "ord", "a")
    );
    // h2 full: only the source's host and h3 (no endpoint) are left.
    let before = everything(&env).await;
    let (result, _, _) = env
        .run(&["fork", &source_id, "--region", "ewr", "--detach", "--json"])
        .await;
    let error = result.unwrap_err();
    assert_eq!(error.exit_code(), exit::CAPACITY, "{error}");
    let text = error.to_string();
    assert!(
        text.starts_with("no host in ewr can take 5 GB: 1 host, most headroom 0 GB (h2)"),
        "{text}"
    );
    assert!(
        text.contains(
            "h3 publish no migration endpoint (start their volumed with --migration-listen)"
        ),
        "{text}"
    );
    assert!(
        error.details()[0].starts_with("h2: over-commit"),
        "{:?}",
        error.details()
    );
    assert_eq!(everything(&env).await, before, "nothing changed");
}

#[tokio::test]
async fn refusals_name_what_failed_and_change_nothing() {
    let env = hosts().await;
    env.publish(&migrating_host("h4", "ewr", "d", GB / 10))
        .await;
    let mut stale = migrating_host("h5", "ewr", "e", 10 * GB);
    stale.heartbeat_ms -= 120_000;
    env.publish(&stale).await;
    let source_id = source_on(&env, "h1").await;
    let on_h3 = source_on(&env, "h3").await;
    let (result, stdout, _) = env
        .run(&[
            "create",
            "plain",
            "--size",
            "1",
            "--region",
            "ewr",
            "--host",
            "h1",
            "--no-encryption",
            "--detach",
            "--json",
        ])
        .await;
    result.unwrap();
    let plain = common::created_ids(&stdout)[0].to_string();
    let before = everything(&env).await;

    let cases: [(&[&str], i32, &str); 8] = [
        (
            &["fork", &plain, "--host", "h2"],
            exit::USAGE,
            "is unencrypted: a fork or move to another host streams its blocks between hosts, \
             and that stream must carry only ciphertext",
        ),
        (
            &["move", &source_id, "--host", "h3"],
            exit::USAGE,
            "host h3 (the destination) publishes no migration endpoint: start its volumed with \
             --migration-listen",
        ),
        (
            &["fork", &on_h3, "--host", "h2"],
            exit::USAGE,
            "host h3 (the source) publishes no migration endpoint",
        ),
        (
            &["move", &source_id, "--host", "h1"],
            exit::USAGE,
            "is on host h1 already: a fork or move to another host needs another",
        ),
        (
            &["fork", &source_id, "--host", "h4"],
            exit::CAPACITY,
            "host h4 cannot take",
        ),
        (
            &["fork", &source_id, "--host", "h5"],
            exit::CAPACITY,
            "host h5 in ewr cannot take 5 GB: heartbeat 1",
        ),
        (
            &["fork", &source_id, "--host", "h9"],
            exit::USAGE,
            "host h9 has published no host record",
        ),
        (
            &["move", "vol_0000000000000000", "--region", "ewr"],
            exit::NOT_FOUND,
            "no volume vol_0000000000000000",
        ),
    ];
    for (argv, code, message) in cases {
        let (result, stdout, stderr) = env.run(argv).await;
        let error = result.unwrap_err();
        assert_eq!(error.exit_code(), code, "{argv:?}: {error}\n{stderr}");
        assert!(error.to_string().contains(message), "{argv:?}: {error}");
        assert!(stdout.is_empty(), "{argv:?}: {stdout}");
        assert_eq!(everything(&env).await, before, "{argv:?} changed nothing");
    }

    // A source being destroyed.
    let (result, _, _) = env.run(&["destroy", &source_id, "--yes", "--detach"]).await;
    result.unwrap();
    let before = everything(&env).await;
    let (result, _, _) = env.run(&["fork", &source_id, "--host", "h2"]).await;
    let error = result.unwrap_err();
    assert!(matches!(error, CliError::BeingDestroyed { .. }), "{error}");
    assert_eq!(error.exit_code(), exit::ERROR);
    assert_eq!(everything(&env).await, before);
}

#[tokio::test]
async fn a_move_needs_its_source_to_itself() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    let (result, stdout, stderr) = env
        .run(&["fork", &source_id, "--host", "h2", "--detach", "--json"])
        .await;
    result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
    let (fork, _) = recorded(&stdout);

    // While the fork copies: a move of its source is refused, a second
    // fork is not.
    let before = everything(&env).await;
    let (result, stdout, _) = env
        .run(&["move", &source_id, "--host", "o1", "--detach"])
        .await;
    let error = result.unwrap_err();
    assert!(
        matches!(&error, CliError::SourceInMigration { migration, .. } if *migration == fork),
        "{error}"
    );
    assert_eq!(error.exit_code(), exit::USAGE);
    assert!(
        error.to_string().contains(&format!(
            "volume {source_id} is the source of fork {fork}, still in progress"
        )),
        "{error}"
    );
    assert!(stdout.is_empty());
    assert_eq!(
        everything(&env).await,
        before,
        "the refused move changed nothing"
    );
    let (result, _, stderr) = env
        .run(&["fork", &source_id, "--host", "o1", "--detach", "--json"])
        .await;
    result.unwrap_or_else(|e| panic!("a second fork: {e}\n{stderr}"));

    // Once both forks have been released by the source, a move may start,
    // and while it runs no fork or move of that source may.
    let spec = env.spec(&source_id).await;
    for other in migrations(&env).await {
        write_status(&env, &spec.host, &other.id, MigrationState::Released).await;
    }
    let (result, stdout, stderr) = env
        .run(&["move", &source_id, "--host", "o1", "--detach", "--json"])
        .await;
    result.unwrap_or_else(|e| panic!("the move: {e}\n{stderr}"));
    let (moving, _) = recorded(&stdout);
    for kind in ["fork", "move"] {
        let before = everything(&env).await;
        let (result, _, _) = env
            .run(&[kind, &source_id, "--host", "h2", "--detach"])
            .await;
        let error = result.unwrap_err();
        assert!(
            error
                .to_string()
                .contains(&format!("is the source of move {moving}")),
            "{kind}: {error}"
        );
        assert_eq!(
            everything(&env).await,
            before,
            "the refused {kind} changed nothing"
        );
    }
}

type Hook = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What the proxy does to the first transaction.
enum FirstTxn {
    /// Runs the hook against the server directly, then relays it: another
    /// writer got there between volctl's reads and its txn.
    RaceWith(Hook),
    /// Relays it and lets it commit, then closes the client's connection
    /// instead of relaying the answer.
    LoseAnswer,
}

/// A proxy to the server that does `first` to the first transaction and
/// relays everything else. Returns its URL.
async fn interpose(upstream: SocketAddr, first: FirstTxn) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let first = Arc::new(tokio::sync::Mutex::new(Some(first)));
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(relay(client, upstream, first.clone()));
        }
    });
    url
}

async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    first: Arc<tokio::sync::Mutex<Option<FirstTxn>>>,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let mut from_client = vec![0u8; 64 * 1024];
    let mut from_server = vec![0u8; 64 * 1024];
    let mut lose_answer = false;
    loop {
        tokio::select! {
            read = client.read(&mut from_client) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let chunk = &from_client[..n];
                if chunk.windows(11).any(|window| window == b"PUT /v1/txn") {
                    let taken = first.lock().await.take();
                    match taken {
                        Some(FirstTxn::RaceWith(hook)) => hook.await,
                        Some(FirstTxn::LoseAnswer) => lose_answer = true,
                        None => {}
                    }
                }
                if server.write_all(chunk).await.is_err() {
                    return;
                }
            }
            read = server.read(&mut from_server) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if lose_answer {
                    // The server has answered: the txn is decided.
                    return;
                }
                if client.write_all(&from_server[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn upstream(env: &Env) -> SocketAddr {
    env.server
        .url()
        .trim_start_matches("http://")
        .parse()
        .unwrap()
}

/// A reservation on h2 written by someone else, as a create's would be.
fn reserve_on_h2(kv: consul_kv::ConsulKv, reserved: Bytes) -> Hook {
    Box::pin(async move {
        let store = Store::new(kv);
        let ledger = Ledger {
            reserved,
            volumes: 1,
        };
        let key = store.layout.host_ledger(&HostId::new("h2").unwrap());
        store
            .kv
            .put(&key, &serde_json::to_vec(&ledger).unwrap())
            .await
            .unwrap();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_change_between_read_and_txn_is_retried_and_never_overcommits() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;

    // Room is left after the other writer: the retry adds to its ledger.
    let url = interpose(
        upstream(&env),
        FirstTxn::RaceWith(reserve_on_h2(env.kv.clone(), Bytes(10 * GB))),
    )
    .await;
    let argv = ["fork", &source_id, "--host", "h2", "--detach", "--json"];
    let (result, stdout, stderr) = common::run_at(common::client(&url), &argv).await;
    result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
    recorded(&stdout);
    assert_eq!(
        env.ledger("h2").await,
        Some(Ledger {
            reserved: Bytes(15 * GB),
            volumes: 2
        }),
        "both reservations count"
    );

    // No room is left after the other writer: the retry refuses.
    let before_migrations = migrations(&env).await.len();
    let url = interpose(
        upstream(&env),
        FirstTxn::RaceWith(reserve_on_h2(env.kv.clone(), Bytes(18 * GB))),
    )
    .await;
    let (result, _, _) = common::run_at(common::client(&url), &argv).await;
    let error = result.unwrap_err();
    assert_eq!(error.exit_code(), exit::CAPACITY, "{error}");
    assert!(error.to_string().contains("host h2 cannot take"), "{error}");
    assert_eq!(
        env.ledger("h2").await,
        Some(Ledger {
            reserved: Bytes(18 * GB),
            volumes: 1
        }),
        "the other writer's ledger stands"
    );
    assert_eq!(migrations(&env).await.len(), before_migrations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_whose_answer_is_lost_is_read_back_not_recorded_twice() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    let url = interpose(upstream(&env), FirstTxn::LoseAnswer).await;
    let argv = ["fork", &source_id, "--region", "ewr", "--detach", "--json"];
    let (result, stdout, stderr) = common::run_at(common::client(&url), &argv).await;
    result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
    assert!(
        stderr.contains("reading back whether it was recorded"),
        "{stderr}"
    );
    let (id, new_id) = recorded(&stdout);
    let recorded = migrations(&env).await;
    assert_eq!(recorded.len(), 1, "one migration: {recorded:?}");
    assert_eq!(
        (&recorded[0].id, recorded[0].destination.volume.as_str()),
        (&id, new_id.as_str())
    );
    assert_eq!(
        env.ledger("h2").await,
        Some(Ledger {
            reserved: Bytes(5 * GB),
            volumes: 1
        }),
        "one reservation"
    );
}

#[tokio::test]
async fn a_fork_without_a_destination_stays_on_the_volume_s_host() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    let (result, stdout, stderr) = env
        .run(&["fork", &source_id, "--name", "copy", "--detach", "--json"])
        .await;
    result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
    let new = env.spec(common::created_ids(&stdout)[0].as_str()).await;
    assert_eq!((new.host.as_str(), new.name.as_str()), ("h1", "copy"));
    assert!(
        matches!(new.source, Some(VolumeSource::Fork { .. })),
        "{new:?}"
    );
    assert!(migrations(&env).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_forks_to_one_host_fill_it_exactly() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    // h2 takes 20 GB: four of the 5 GB forks.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let kv = env.kv.clone();
            let source_id = source_id.clone();
            tokio::spawn(async move {
                let argv = ["fork", &source_id, "--host", "h2", "--detach", "--json"];
                common::run_at(kv, &argv).await
            })
        })
        .collect();
    let (mut placed, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            (Ok(()), _, _) => placed += 1,
            (Err(error), _, _) if error.exit_code() == exit::CAPACITY => refused += 1,
            (Err(other), _, stderr) => panic!("neither placed nor refused: {other}\n{stderr}"),
        }
    }
    assert_eq!((placed, refused), (4, 4));
    let on_h2: Vec<VolumeSpec> = env
        .specs()
        .await
        .into_iter()
        .filter(|spec| spec.host.as_str() == "h2")
        .collect();
    assert_eq!(on_h2.len(), 4);
    assert_eq!(migrations(&env).await.len(), 4);
    assert_eq!(
        env.ledger("h2").await,
        Some(Ledger {
            reserved: Bytes(20 * GB),
            volumes: 4
        })
    );
}

#[tokio::test]
async fn cancel_sets_both_flags_in_one_txn_and_is_idempotent() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    let (result, stdout, _) = env
        .run(&["move", &source_id, "--host", "h2", "--detach", "--json"])
        .await;
    result.unwrap();
    let (id, new_id) = recorded(&stdout);
    write_status(&env, &HostId::new("h2").unwrap(), &id, hydrating(10)).await;

    let before = everything(&env).await;
    // Named by its source: refused, naming the migration to cancel.
    let (result, _, _) = env.run(&["cancel", &source_id, "--detach"]).await;
    let error = result.unwrap_err();
    assert_eq!(error.exit_code(), exit::USAGE);
    assert!(
        error.to_string().ends_with(&format!(
            "nothing to cancel (it is the source of migration {id}: `volctl cancel {id}`)"
        )),
        "{error}"
    );
    assert_eq!(everything(&env).await, before);
    // Nor is the source destroyed while its blocks are still needed.
    let (result, _, _) = env.run(&["destroy", &source_id, "--yes"]).await;
    let error = result.unwrap_err();
    assert_eq!(error.exit_code(), exit::USAGE);
    assert!(
        error.to_string().contains(&format!(
            "is the source of migration {id}, whose copy is not complete"
        )),
        "{error}"
    );
    assert_eq!(everything(&env).await, before);

    let (result, stdout, stderr) = env.run(&["cancel", id.as_str(), "--detach"]).await;
    result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
    assert_eq!(
        stdout.trim(),
        format!(
            "cancel of migration {id} requested: {new_id} on h2 is being destroyed, \
             {source_id} on h1 stays"
        )
    );
    let after = everything(&env).await;
    assert_eq!(
        changed(&before, &after),
        [
            format!("volumes/v1/desired/h2/{new_id}"),
            format!("volumes/v1/migrations/{id}"),
        ]
    );
    assert!(migrations(&env).await[0].cancel);
    assert!(env.spec(&new_id).await.destroy);
    assert!(!env.spec(&source_id).await.destroy, "the source stays");

    // Again, by the new volume's id: nothing more is written.
    let (result, stdout, _) = env.run(&["cancel", &new_id, "--detach"]).await;
    result.unwrap();
    assert!(
        stdout.starts_with(&format!("migration {id} is already cancelled\n")),
        "{stdout}"
    );
    assert_eq!(everything(&env).await, after);
    // Cancelled: the source is the operator's again.
    let (result, _, stderr) = env.run(&["destroy", &source_id, "--yes", "--detach"]).await;
    result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_waits_until_the_new_volume_is_gone() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    let (result, stdout, _) = env
        .run(&["fork", &source_id, "--host", "h2", "--detach", "--json"])
        .await;
    result.unwrap();
    let (id, new_id) = recorded(&stdout);
    // The destination's volumed: removes the volume once destroy is set.
    let volumed = {
        let store = Store::new(env.kv.clone());
        let new_id = new_id.clone();
        tokio::spawn(async move {
            loop {
                let spec = store.spec(&new_id).await;
                if spec.destroy {
                    remove_and_release(&store, &spec).await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let (result, stdout, stderr) = env.run(&["cancel", &new_id, "--timeout", "20"]).await;
    result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
    volumed.await.unwrap();
    assert_eq!(
        stdout.trim(),
        format!("cancelled migration {id}: {new_id} on h2 is destroyed, {source_id} on h1 stays")
    );
    assert_eq!(env.ledger("h2").await, Some(Ledger::default()));

    // Cancelled and gone: still not an error.
    let (result, stdout, _) = env.run(&["cancel", id.as_str()]).await;
    result.unwrap();
    assert_eq!(
        stdout,
        format!("migration {id} is already cancelled\n{new_id} on h2 is gone; {source_id} on h1 stays\n")
    );
}

#[tokio::test]
async fn cancel_refuses_a_complete_migration_and_what_is_no_migration() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    let (result, stdout, _) = env
        .run(&["move", &source_id, "--host", "h2", "--detach", "--json"])
        .await;
    result.unwrap();
    let (id, new_id) = recorded(&stdout);
    write_status(
        &env,
        &HostId::new("h2").unwrap(),
        &id,
        MigrationState::Complete,
    )
    .await;
    let before = everything(&env).await;
    let (result, _, _) = env.run(&["cancel", &new_id]).await;
    let error = result.unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("nothing to cancel: migration {id} is complete")
    );
    assert_eq!(error.exit_code(), exit::USAGE);
    assert_eq!(everything(&env).await, before);

    let (result, _, _) = env.run(&["cancel", &source_id]).await;
    let error = result.unwrap_err();
    assert!(
        matches!(
            error,
            CliError::NotAMigration {
                source_of: None,
                ..
            }
        ),
        "a complete migration is not named: {error}"
    );
    assert_eq!(error.exit_code(), exit::USAGE);
    let (result, _, _) = env.run(&["cancel", "mig_0000000000000000"]).await;
    assert_eq!(result.unwrap_err().exit_code(), exit::NOT_FOUND);
    let (result, _, _) = env.run(&["cancel", "vol_0000000000000000"]).await;
    assert_eq!(result.unwrap_err().exit_code(), exit::NOT_FOUND);
    let (result, _, _) = env.run(&["cancel", "data"]).await;
    assert_eq!(result.unwrap_err().exit_code(), exit::USAGE);
    assert_eq!(everything(&env).await, before);
}

#[tokio::test]
async fn show_and_list_report_the_hydration() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    let (result, stdout, _) = env
        .run(&["fork", &source_id, "--host", "h2", "--detach", "--json"])
        .await;
    result.unwrap();
    let (id, new_id) = recorded(&stdout);
    let h2 = HostId::new("h2").unwrap();
    let new = env.spec(&new_id).await;
    env.report(&new, VolumeState::Ready, None).await;

    let show = |env: &Env, json: bool| {
        let mut argv = vec!["show".to_owned(), new_id.clone()];
        if json {
            argv.push("--json".to_owned());
        }
        let kv = env.kv.clone();
        async move {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let (result, stdout, stderr) = common::run_at(kv, &argv).await;
            result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
            stdout
        }
    };
    let hydration_line = |stdout: &str| field(stdout, "hydration");

    let stdout = show(&env, false).await;
    assert_eq!(hydration_line(&stdout), "pending (no report yet)");
    assert!(
        stdout.contains(&format!("{id} (fork from {source_id} on h1)")),
        "{stdout}"
    );
    write_status(&env, &h2, &id, hydrating(84)).await;
    let stdout = show(&env, false).await;
    assert_eq!(
        hydration_line(&stdout),
        "42.00% (84 MiB of 200 MiB, 3.6 MiB/s)"
    );
    assert_eq!(field(&stdout, "state"), "hydrating");
    let view: serde_json::Value = serde_json::from_str(&show(&env, true).await).unwrap();
    assert_eq!(
        view["migration"],
        serde_json::json!({
            "id": id.as_str(), "kind": "fork", "state": "hydrating",
            "copied": 84 * MIB, "total": 200 * MIB, "rate": 3_774_873,
            "updated_ms": view["migration"]["updated_ms"],
        })
    );
    assert_eq!(view["state"], "ready", "the host's state as it reported it");

    let (result, stdout, _) = env.run(&["list"]).await;
    result.unwrap();
    let row = stdout.lines().find(|l| l.starts_with(&new_id)).unwrap();
    assert!(row.contains(" hydrating "), "{stdout}");

    // While copying, its blocks are not all here: nothing may snapshot,
    // fork, move or grow it.
    let before = everything(&env).await;
    for argv in [
        &["extend", new_id.as_str(), "--size", "6", "--detach"][..],
        &["snapshots", "create", new_id.as_str(), "--detach"],
        &["fork", new_id.as_str(), "--detach"],
        &["move", new_id.as_str(), "--host", "o1", "--detach"],
    ] {
        let (result, _, _) = env.run(argv).await;
        let error = result.unwrap_err();
        assert!(
            matches!(error, CliError::StillHydrating { .. }),
            "{argv:?}: {error}"
        );
        assert_eq!(error.exit_code(), exit::USAGE);
        assert!(
            error.to_string().contains(&format!(
                "its blocks are still being copied from its source (migration {id}: 42.00%"
            )),
            "{error}"
        );
    }
    assert_eq!(everything(&env).await, before, "nothing changed");

    write_status(&env, &h2, &id, MigrationState::SourceUnreachable).await;
    assert_eq!(
        hydration_line(&show(&env, false).await),
        "source unreachable"
    );
    write_status(&env, &h2, &id, MigrationState::Complete).await;
    let stdout = show(&env, false).await;
    assert_eq!(hydration_line(&stdout), "complete");
    assert_eq!(field(&stdout, "state"), "ready");
    let (result, stdout, _) = env.run(&["list", "--json"]).await;
    result.unwrap();
    let views: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let listed = views
        .as_array()
        .unwrap()
        .iter()
        .find(|view| view["id"] == new_id.as_str())
        .unwrap();
    assert_eq!(listed["migration"]["state"], "complete");
    // Complete: its own volume like any other.
    let (result, _, stderr) = env.run(&["snapshots", "create", &new_id, "--detach"]).await;
    result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
    // A volume not made by a migration has no such line or object.
    let (result, stdout, _) = env.run(&["show", &source_id]).await;
    result.unwrap();
    assert!(!stdout.contains("hydration"), "{stdout}");
}

/// The value of a one-word label in `show`'s output.
fn field(stdout: &str, label: &str) -> String {
    stdout
        .lines()
        .find_map(|line| {
            line.strip_prefix(label)
                .filter(|rest| rest.starts_with("  "))
        })
        .unwrap_or_else(|| panic!("no {label} line: {stdout}"))
        .trim()
        .to_owned()
}

/// Removes a destroyed volume's records and returns its reservation, as
/// its volumed's destroy path does.
async fn remove_and_release(store: &Store, spec: &VolumeSpec) {
    let key = store.layout.desired(&spec.host, &spec.id);
    let pair = store.kv.get(&key).await.unwrap().value.unwrap();
    let ledger_key = store.layout.host_ledger(&spec.host);
    let ledger_pair = store.kv.get(&ledger_key).await.unwrap().value.unwrap();
    let ledger: Ledger = serde_json::from_slice(&ledger_pair.value).unwrap();
    let released = Ledger {
        reserved: ledger.reserved - spec.size,
        volumes: ledger.volumes - 1,
    };
    let ops = [
        TxnOp::Cas {
            key: ledger_key,
            value: serde_json::to_vec(&released).unwrap(),
            flags: 0,
            index: ledger_pair.modify_index,
        },
        TxnOp::Delete {
            key: store.layout.status(&spec.host, &spec.id),
        },
        TxnOp::DeleteCas {
            key,
            index: pair.modify_index,
        },
    ];
    store.kv.txn(&ops).await.unwrap();
}

/// Plays both volumeds through one migration: the new volume ready, its
/// copy at 10%, 42% and 90% with the source away once, complete; for a
/// move the source then records its destroy, says `released` and is
/// removed.
async fn play_migration(store: Store) {
    let spec = loop {
        if let Some(spec) = migrations(&store).await.pop() {
            break spec;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (source, destination) = (&spec.source, &spec.destination);
    write_status(
        &store,
        &source.host,
        &spec.id,
        MigrationState::Exporting {
            address: "127.0.0.1:10809".parse().unwrap(),
        },
    )
    .await;
    let new = store.spec(destination.volume.as_str()).await;
    store.report(&new, VolumeState::Creating, None).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.report(&new, VolumeState::Ready, None).await;
    for state in [
        hydrating(20),
        hydrating(84),
        MigrationState::SourceUnreachable,
        hydrating(180),
        MigrationState::Complete,
    ] {
        // Far enough apart for the waiting volctl to see each one.
        tokio::time::sleep(Duration::from_millis(300)).await;
        write_status(&store, &destination.host, &spec.id, state).await;
    }
    if spec.kind == MigrationKind::Move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let key = store.layout.desired(&source.host, &source.volume);
        let pair = store.kv.get(&key).await.unwrap().value.unwrap();
        let mut old: VolumeSpec = serde_json::from_slice(&pair.value).unwrap();
        old.destroy = true;
        assert!(store
            .kv
            .put_cas(&key, &serde_json::to_vec(&old).unwrap(), pair.modify_index)
            .await
            .unwrap());
        write_status(&store, &source.host, &spec.id, MigrationState::Released).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        remove_and_release(&store, &old).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_waits_until_usable_then_until_the_copy_is_complete() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    let volumed = tokio::spawn(play_migration(Store::new(env.kv.clone())));
    let (result, stdout, stderr) = env
        .run(&["fork", &source_id, "--host", "h2", "--timeout", "20"])
        .await;
    result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
    volumed.await.unwrap();
    let spec = &migrations(&env).await[0];
    let new_id = spec.destination.volume.to_string();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("recorded the fork of"), "{stdout}");
    assert!(
        lines[1].starts_with(&format!("{new_id} on h2 is usable after ")),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with(&format!("{new_id} on h2: copy complete after ")),
        "{stdout}"
    );
    assert!(lines[3].starts_with("ID "), "then the new volume: {stdout}");
    // Not a terminal: plain lines, one per state and tenth, never a bar.
    assert!(!stderr.contains('\r') && !stderr.contains("[#"), "{stderr}");
    for expected in [
        "10.00% (20 MiB of 200 MiB, 3.6 MiB/s)",
        "42.00% (84 MiB of 200 MiB, 3.6 MiB/s)",
        "source unreachable (42.00%, 84 MiB of 200 MiB copied)",
        "90.00% (180 MiB of 200 MiB, 3.6 MiB/s)",
        ": complete (",
    ] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
    assert!(
        !env.spec(&source_id).await.destroy,
        "a fork keeps its source"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_waits_until_the_source_is_released_and_gone() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    let volumed = tokio::spawn(play_migration(Store::new(env.kv.clone())));
    let (result, stdout, stderr) = env
        .run(&[
            "move",
            &source_id,
            "--region",
            "ewr",
            "--timeout",
            "20",
            "--json",
        ])
        .await;
    result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
    volumed.await.unwrap();
    // stdout is the JSON alone; the steps went to stderr.
    let output: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(output["migration"]["kind"], "move");
    assert_eq!(output["volume"]["state"], "ready");
    assert_eq!(output["volume"]["migration"]["state"], "complete");
    assert_eq!(output["source_status"]["state"], "released");
    assert!(
        stderr.contains(&format!(
            "{source_id} on h1 is destroyed and its 5 GB on h1 returned"
        )),
        "{stderr}"
    );
    assert!(
        env.specs()
            .await
            .iter()
            .all(|spec| spec.id.as_str() != source_id),
        "the source is gone"
    );
    assert_eq!(
        env.ledger("h1").await,
        Some(Ledger::default()),
        "its reservation returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_does_not_advance_times_out_and_a_terminal_gets_a_bar() {
    let env = hosts().await;
    let source_id = source_on(&env, "h1").await;
    let store = Store::new(env.kv.clone());
    // The new volume is usable and its copy stands at 50%.
    let volumed = tokio::spawn(async move {
        let spec = loop {
            if let Some(spec) = migrations(&store).await.pop() {
                break spec;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let new = store.spec(spec.destination.volume.as_str()).await;
        store.report(&new, VolumeState::Ready, None).await;
        write_status(&store, &spec.destination.host, &spec.id, hydrating(100)).await;
    });
    let argv = ["fork", &source_id, "--host", "h2", "--timeout", "2"];
    let ((result, _, stderr), _) = common::run_on_terminal(env.kv.clone(), &argv, true, None).await;
    volumed.await.unwrap();
    let error = result.unwrap_err();
    assert_eq!(error.exit_code(), exit::TIMED_OUT, "{error}");
    let text = error.to_string();
    assert!(
        text.contains("to become hydrated (migration mig_"),
        "{text}"
    );
    assert!(text.contains("the copy did not advance for 2s"), "{text}");
    assert!(
        stderr.contains("[##########----------] 50.00% (100 MiB of 200 MiB, 3.6 MiB/s)"),
        "{stderr:?}"
    );
    // The migration stays recorded.
    assert_eq!(migrations(&env).await.len(), 1);
}

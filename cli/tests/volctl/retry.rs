//! A create whose transaction's answer is lost: volctl must find out what
//! happened instead of guessing, and a retried command must not make a
//! second volume.
//!
//! [`LossyProxy`] sits between volctl and the KV server and breaks the
//! connection of a `PUT /v1/txn` either after the server has answered (the
//! transaction committed) or before the request reaches the server.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use volctl::{exit, CliError};
use volume_control::layout::VolumeState;

use crate::common::{self, host, Env, Store, GB};

/// What the proxy does to the next transaction request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Forward it, let the server commit, then close the client's
    /// connection instead of relaying the answer.
    Answer,
    /// Close the client's connection without forwarding it.
    Request,
    /// Relay it.
    Nothing,
}

struct LossyProxy {
    addr: SocketAddr,
    /// One entry per coming transaction; relayed normally once empty.
    plan: Arc<Mutex<VecDeque<Loss>>>,
    /// Once set (by a lost answer with `then_refuse`), every connection
    /// is closed: the store looks unreachable.
    refusing: Arc<AtomicBool>,
}

impl LossyProxy {
    async fn start(upstream: SocketAddr, plan: &[Loss], then_refuse: bool) -> LossyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = LossyProxy {
            addr: listener.local_addr().unwrap(),
            plan: Arc::new(Mutex::new(plan.iter().copied().collect())),
            refusing: Arc::new(AtomicBool::new(false)),
        };
        let (plan, refusing) = (proxy.plan.clone(), proxy.refusing.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (plan, refusing) = (plan.clone(), refusing.clone());
                tokio::spawn(relay(client, upstream, plan, refusing, then_refuse));
            }
        });
        proxy
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn losses_left(&self) -> usize {
        self.plan.lock().unwrap().len()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// Relays one connection both ways; returning closes both sockets.
async fn relay(
    mut client: TcpStream,
    upstream: SocketAddr,
    plan: Arc<Mutex<VecDeque<Loss>>>,
    refusing: Arc<AtomicBool>,
    then_refuse: bool,
) {
    if refusing.load(Ordering::SeqCst) {
        return;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let mut from_client = vec![0u8; 64 * 1024];
    let mut from_server = vec![0u8; 64 * 1024];
    // The transaction on this connection committed; its answer is dropped.
    let mut swallow_answer = false;
    loop {
        tokio::select! {
            read = client.read(&mut from_client) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if refusing.load(Ordering::SeqCst) {
                    return;
                }
                let chunk = &from_client[..n];
                if contains(chunk, b"PUT /v1/txn") {
                    let loss = plan.lock().unwrap().pop_front();
                    match loss {
                        Some(Loss::Request) => return,
                        Some(Loss::Answer) => swallow_answer = true,
                        Some(Loss::Nothing) | None => {}
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
                if swallow_answer {
                    // The server has answered: the transaction is decided.
                    if then_refuse {
                        refusing.store(true, Ordering::SeqCst);
                    }
                    return;
                }
                if client.write_all(&from_server[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn two_hosts() -> Env {
    let env = common::start().await;
    env.publish(&host("h1", "ewr", "a", 2 * GB)).await;
    env.publish(&host("h2", "ewr", "b", 2 * GB)).await;
    env
}

fn upstream(env: &Env) -> SocketAddr {
    let url = env.server.url();
    url.trim_start_matches("http://").parse().unwrap()
}

/// Every ledger's reservations, summed: (bytes, volumes).
async fn total_reserved(env: &Env) -> (u64, u64) {
    let mut total = (0, 0);
    for id in ["h1", "h2"] {
        let ledger = env.ledger(id).await.unwrap_or_default();
        total.0 += ledger.reserved.0;
        total.1 += u64::from(ledger.volumes);
    }
    total
}

/// Plays the volume's host: reports it ready once its record shows up.
async fn report_ready_when_recorded(store: Store) {
    loop {
        if let Some(spec) = store.specs().await.into_iter().next() {
            store.report(&spec, VolumeState::Ready, None).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_create_whose_answer_is_lost_is_read_back_and_waited_for() {
    let env = two_hosts().await;
    let proxy = LossyProxy::start(upstream(&env), &[Loss::Answer], false).await;
    let host = tokio::spawn(report_ready_when_recorded(Store::new(env.kv.clone())));

    let argv = [
        "create",
        "data",
        "--size",
        "2",
        "--region",
        "ewr",
        "--json",
        "--timeout",
        "30",
    ];
    let (result, stdout, stderr) = common::run_at(common::client(&proxy.url()), &argv).await;
    assert_eq!(proxy.losses_left(), 0, "the proxy lost the answer");
    result.unwrap_or_else(|e| panic!("create after a lost answer: {e}\n{stderr}"));
    host.await.unwrap();

    let ids = common::created_ids(&stdout);
    let specs = env.specs().await;
    assert_eq!(specs.len(), 1, "exactly one desired record: {specs:?}");
    assert_eq!(ids, vec![specs[0].id.clone()], "volctl reports its id");
    assert_eq!(total_reserved(&env).await, (2 * GB, 1), "one reservation");
    let views: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(views[0]["state"], "ready", "it waited for the host");
    assert!(stderr.contains("reading back"), "{stderr}");
}

#[tokio::test]
async fn a_create_lost_before_the_store_saw_it_is_sent_again_under_the_same_id() {
    let env = two_hosts().await;
    let proxy = LossyProxy::start(upstream(&env), &[Loss::Request], false).await;

    let argv = [
        "create", "data", "--size", "2", "--region", "ewr", "--detach", "--json",
    ];
    let (result, stdout, stderr) = common::run_at(common::client(&proxy.url()), &argv).await;
    assert_eq!(proxy.losses_left(), 0, "the proxy lost the request");
    result.unwrap_or_else(|e| panic!("create after a lost request: {e}\n{stderr}"));

    let ids = common::created_ids(&stdout);
    let specs = env.specs().await;
    assert_eq!(specs.len(), 1, "exactly one desired record: {specs:?}");
    assert_eq!(ids, vec![specs[0].id.clone()]);
    assert_eq!(total_reserved(&env).await, (2 * GB, 1));
}

#[tokio::test]
async fn when_the_store_stays_away_the_id_is_named_and_a_retry_with_it_makes_no_second_volume() {
    let env = two_hosts().await;
    let proxy = LossyProxy::start(upstream(&env), &[Loss::Answer], true).await;

    let argv = [
        "create", "data", "--size", "2", "--region", "ewr", "--detach", "--json",
    ];
    let (result, stdout, _) = common::run_at(common::client(&proxy.url()), &argv).await;
    let error = result.expect_err("the outcome cannot be known");
    assert_eq!(error.exit_code(), exit::UNREACHABLE);
    assert!(stdout.is_empty(), "{stdout}");
    let message = error.to_string();
    let specs = env.specs().await;
    assert_eq!(specs.len(), 1, "the lost transaction did commit");
    let id = specs[0].id.to_string();
    assert!(
        message.contains(&id) && message.contains(&format!("--id {id}")),
        "the message names the id and how to retry safely: {message}"
    );

    // The operator retries the command with the id, the store back.
    let retry = [
        "create", "data", "--size", "2", "--region", "ewr", "--detach", "--json", "--id", &id,
    ];
    let (result, stdout, stderr) = env.run(&retry).await;
    result.unwrap_or_else(|e| panic!("retry with --id: {e}\n{stderr}"));
    assert_eq!(common::created_ids(&stdout)[0].as_str(), id);
    assert!(stderr.contains("already recorded"), "{stderr}");
    assert_eq!(env.specs().await.len(), 1, "no second desired record");
    assert_eq!(
        total_reserved(&env).await,
        (2 * GB, 1),
        "no second reservation"
    );

    // The same id for a different volume is refused, and changes nothing.
    let other = [
        "create", "data", "--size", "3", "--region", "ewr", "--detach", "--id", &id,
    ];
    let (result, _, _) = env.run(&other).await;
    let error = result.expect_err("a different volume under a taken id");
    assert_eq!(error.exit_code(), exit::USAGE, "{error}");
    assert!(error.to_string().contains("3 GB"), "{error}");
    assert_eq!(env.specs().await.len(), 1);
    assert_eq!(total_reserved(&env).await, (2 * GB, 1));

    // A fresh id of the caller's choosing creates exactly that volume.
    let fresh = "vol_0123456789abcdef";
    let (result, stdout, stderr) = env
        .run(&[
            "create", "data", "--size", "2", "--region", "ewr", "--detach", "--json", "--id", fresh,
        ])
        .await;
    result.unwrap_or_else(|e| panic!("create with a fresh --id: {e}\n{stderr}"));
    assert_eq!(common::created_ids(&stdout)[0].as_str(), fresh);
    assert_eq!(total_reserved(&env).await, (4 * GB, 2));

    // One id names one volume: it cannot go with --count.
    let (result, _, _) = env
        .run(&[
            "create", "data", "--size", "1", "--region", "ewr", "--count", "2", "--id", fresh,
        ])
        .await;
    assert!(matches!(result, Err(CliError::Usage(_))), "{result:?}");
    assert_eq!(total_reserved(&env).await, (4 * GB, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_with_one_id_make_one_volume() {
    let env = two_hosts().await;
    let id = "vol_concurrentrun001";
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let kv = env.kv.clone();
            tokio::spawn(async move {
                let argv = [
                    "create", "data", "--size", "2", "--region", "ewr", "--detach", "--json",
                    "--id", id,
                ];
                common::run_at(kv, &argv).await
            })
        })
        .collect();
    for task in tasks {
        let (result, stdout, stderr) = task.await.unwrap();
        result.unwrap_or_else(|e| panic!("{e}\n{stderr}"));
        assert_eq!(common::created_ids(&stdout)[0].as_str(), id);
    }
    assert_eq!(env.specs().await.len(), 1);
    assert_eq!(total_reserved(&env).await, (2 * GB, 1));
}

#[tokio::test]
async fn a_count_cut_short_by_a_lost_answer_names_every_recorded_volume() {
    let env = two_hosts().await;
    // The first create goes through; the second's answer is lost and the
    // store then stays away.
    let proxy = LossyProxy::start(upstream(&env), &[Loss::Nothing, Loss::Answer], true).await;
    let argv = [
        "create", "data", "--size", "1", "--region", "ewr", "--count", "3", "--detach",
    ];
    let (result, _, _) = common::run_at(common::client(&proxy.url()), &argv).await;
    let error = result.expect_err("the store went away mid-count");
    assert_eq!(error.exit_code(), exit::UNREACHABLE, "{error}");
    let message = error.to_string();
    let specs = env.specs().await;
    assert_eq!(specs.len(), 2, "the first and the lost one: {specs:?}");
    for spec in &specs {
        assert!(
            message.contains(spec.id.as_str()),
            "{} missing: {message}",
            spec.id
        );
    }
    assert!(message.starts_with("recorded 1 of 3 volumes"), "{message}");
}

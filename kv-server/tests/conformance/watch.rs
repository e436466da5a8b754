//! The prefix watch: yields on changes only, errors are errors, resets when
//! the index goes backwards, paces itself.

use std::time::{Duration, Instant};

use consul_kv::client::WatchOptions;
use consul_kv_server::ServerConfig;

use crate::common::*;

fn quick() -> WatchOptions {
    WatchOptions {
        wait: Duration::from_secs(2),
        min_interval: Duration::from_millis(10),
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_millis(400),
    }
}

#[tokio::test]
async fn yields_initial_state_then_changes_only() {
    let server = start().await;
    let kv = client(&server);
    let mut watch = kv.watch_prefix("vol/", quick());
    let limit = Duration::from_secs(5);
    let initial = within(limit, watch.next()).await.unwrap();
    assert!(
        initial.entries.is_empty(),
        "empty prefix is an empty update"
    );
    assert!(initial.index >= 1 && !initial.reset);

    kv.put("vol/1", b"a").await.unwrap();
    let created = within(limit, watch.next()).await.unwrap();
    assert_eq!(created.entries.len(), 1);
    assert!(created.index > initial.index);

    // Nothing under the prefix changes: no update within the wait.
    let writer = kv.clone();
    let unrelated = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.put("other", b"x").await.unwrap();
        writer.put("vol/1", b"a").await.unwrap(); // identical
    });
    let quiet = tokio::time::timeout(Duration::from_millis(800), watch.next()).await;
    assert!(quiet.is_err(), "no update expected, got {quiet:?}");
    unrelated.await.unwrap();

    kv.delete("vol/1").await.unwrap();
    let deleted = within(limit, watch.next()).await.unwrap();
    assert!(deleted.entries.is_empty());
    assert!(deleted.index > created.index);
}

#[tokio::test]
async fn failed_reads_are_errors_and_back_off() {
    let server = start().await;
    let url = server.url();
    server.shutdown().await.unwrap();
    let kv = client_at(&url, None);
    let mut watch = kv.watch_prefix("vol/", quick());
    let limit = Duration::from_secs(5);
    let first = within(limit, watch.next()).await.unwrap_err();
    assert!(first.is_transport(), "{first:?}");
    let started = Instant::now();
    let second = within(limit, watch.next()).await.unwrap_err();
    assert!(second.is_transport());
    // Backoff 200ms, jittered within its upper half.
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(watch.index(), 0);
}

#[tokio::test]
async fn resets_when_the_index_goes_backwards() {
    let old_dir = tempfile::tempdir().unwrap();
    let server = start_with(ServerConfig::loopback().with_data_dir(old_dir.path())).await;
    let addr = server.local_addr();
    let kv = client(&server);
    for i in 0..6 {
        kv.put(&format!("vol/{i}"), b"old").await.unwrap();
    }
    let mut watch = kv.watch_prefix("vol/", quick());
    let old = within(Duration::from_secs(5), watch.next()).await.unwrap();
    assert_eq!(old.entries.len(), 6);

    // The watch is blocked when the server goes away...
    let pending = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        loop {
            let outcome = watch.next().await;
            let done = outcome.is_ok();
            outcomes.push(outcome);
            if done {
                return outcomes;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;

    // ...and a fresh server (empty data dir) takes its address.
    let new_dir = tempfile::tempdir().unwrap();
    let fresh = start_with(ServerConfig::new(addr).with_data_dir(new_dir.path())).await;
    client(&fresh).put("vol/new", b"new").await.unwrap();

    let outcomes = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("watch recovers")
        .unwrap();
    let (last, failures) = outcomes.split_last().unwrap();
    assert!(!failures.is_empty(), "the outage was reported");
    assert!(failures
        .iter()
        .all(|f| f.as_ref().unwrap_err().is_transport()));
    let update = last.as_ref().unwrap();
    assert!(update.reset, "{update:?}");
    assert!(update.index < old.index);
    assert_eq!(update.entries.len(), 1);
    assert_eq!(update.entries[0].key, "vol/new");
    fresh.shutdown().await.unwrap();
}

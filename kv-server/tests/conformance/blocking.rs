//! Blocking queries: wake on a change of the answer's index, and only then.

use std::time::{Duration, Instant};

use consul_kv::BlockingQuery;

use crate::common::*;

const LONG_WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn prefix_watch_wakes_on_put() {
    let server = start().await;
    let kv = client(&server);
    kv.put("vol/a", b"1").await.unwrap();
    let first = kv.get_recurse("vol/").await.unwrap();
    let writer = kv.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        writer.put("vol/b", b"2").await.unwrap();
    });
    let started = Instant::now();
    let woke = kv
        .get_recurse_blocking(
            "vol/",
            BlockingQuery {
                index: first.index,
                wait: LONG_WAIT,
            },
        )
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "woke on the write"
    );
    assert!(woke.index > first.index);
    assert_eq!(woke.value.len(), 2);
}

#[tokio::test]
async fn first_write_wakes_a_watch_on_an_empty_store() {
    let server = start().await;
    let kv = client(&server);
    let empty = kv.get_recurse("vol/").await.unwrap();
    assert_eq!(empty.index, 1);
    let writer = kv.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.put("vol/first", b"1").await.unwrap();
    });
    let woke = within(
        Duration::from_secs(2),
        kv.get_recurse_blocking(
            "vol/",
            BlockingQuery {
                index: empty.index,
                wait: LONG_WAIT,
            },
        ),
    )
    .await
    .unwrap();
    assert_eq!(woke.value.len(), 1);
    assert!(woke.index > 1);
}

#[tokio::test]
async fn prefix_watch_wakes_on_delete() {
    let server = start().await;
    let kv = client(&server);
    kv.put("vol/a", b"1").await.unwrap();
    kv.put("vol/b", b"2").await.unwrap();
    kv.put("unrelated", b"3").await.unwrap();
    let first = kv.get_recurse("vol/").await.unwrap();
    let writer = kv.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        writer.delete("vol/b").await.unwrap();
    });
    let started = Instant::now();
    let woke = kv
        .get_recurse_blocking(
            "vol/",
            BlockingQuery {
                index: first.index,
                wait: LONG_WAIT,
            },
        )
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(woke.index > first.index);
    assert_eq!(woke.value.len(), 1);

    // Deleting the last key: the prefix is empty (404) yet the index rises.
    let writer = kv.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.delete_tree("vol/").await.unwrap();
    });
    let emptied = kv
        .get_recurse_blocking(
            "vol/",
            BlockingQuery {
                index: woke.index,
                wait: LONG_WAIT,
            },
        )
        .await
        .unwrap();
    assert!(emptied.value.is_empty());
    assert!(emptied.index > woke.index);
}

#[tokio::test]
async fn missing_key_watch_wakes_on_create() {
    let server = start().await;
    let kv = client(&server);
    let missing = kv.get("late").await.unwrap();
    assert!(missing.value.is_none());
    let writer = kv.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        writer.put("late", b"here").await.unwrap();
    });
    let found = kv
        .get_blocking(
            "late",
            BlockingQuery {
                index: missing.index,
                wait: LONG_WAIT,
            },
        )
        .await
        .unwrap();
    assert_eq!(found.value.unwrap().value, b"here");
}

/// Starts a blocking read of `vol/` at its current index, runs `during`,
/// and returns how long the read took and whether its index changed.
async fn block_while(
    server: &consul_kv_server::ServerHandle,
    wait: Duration,
    during: impl std::future::Future<Output = ()>,
) -> (Duration, bool) {
    let kv = client(server);
    let first = kv.get_recurse("vol/").await.unwrap();
    let started = Instant::now();
    let read = kv.get_recurse_blocking(
        "vol/",
        BlockingQuery {
            index: first.index,
            wait,
        },
    );
    let (answer, ()) = tokio::join!(read, during);
    (started.elapsed(), answer.unwrap().index != first.index)
}

#[tokio::test]
async fn identical_put_does_not_wake() {
    let server = start().await;
    let kv = client(&server);
    kv.put("vol/a", b"same").await.unwrap();
    let wait = Duration::from_millis(600);
    let (took, changed) = block_while(&server, wait, async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        kv.put("vol/a", b"same").await.unwrap();
    })
    .await;
    assert!(!changed);
    assert!(took >= wait, "returned at the timeout, after {took:?}");
}

#[tokio::test]
async fn writes_elsewhere_do_not_wake_a_prefix() {
    let server = start().await;
    let kv = client(&server);
    kv.put("vol/a", b"1").await.unwrap();
    let wait = Duration::from_millis(500);
    let (took, changed) = block_while(&server, wait, async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        kv.put("volume-other", b"x").await.unwrap();
        kv.put("elsewhere/b", b"x").await.unwrap();
        kv.delete("elsewhere/b").await.unwrap();
    })
    .await;
    assert!(!changed);
    assert!(took >= wait);
}

#[tokio::test]
async fn timeout_has_bounded_jitter() {
    let server = start().await;
    let wait = Duration::from_millis(800);
    let (took, changed) = block_while(&server, wait, async {}).await;
    assert!(!changed);
    // Up to wait/16 of jitter, plus scheduling slack.
    assert!(
        took >= wait && took < wait + wait / 16 + Duration::from_millis(400),
        "{took:?}"
    );
}

#[tokio::test]
async fn wait_accepts_go_durations() {
    let server = start().await;
    for (wait, at_least) in [("300ms", 300u64), ("0.3s", 300)] {
        let started = Instant::now();
        let answer = get_raw(&server, &format!("/v1/kv/x?index=1&wait={wait}")).await;
        assert_eq!(answer.status(), 404);
        assert!(
            started.elapsed() >= Duration::from_millis(at_least),
            "{wait}"
        );
    }
}

#[tokio::test]
async fn shutdown_ends_blocking_queries() {
    let server = start().await;
    let kv = client(&server);
    let first = kv.get_recurse("vol/").await.unwrap();
    let reader = tokio::spawn(async move {
        kv.get_recurse_blocking(
            "vol/",
            BlockingQuery {
                index: first.index,
                wait: Duration::from_secs(60),
            },
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    server.shutdown().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    let answer = reader.await.unwrap().unwrap();
    assert_eq!(answer.index, first.index, "current state, unchanged index");
}

//! Durability: a restart loses nothing and indexes never go backwards.

use consul_kv::TxnOp;
use consul_kv_server::{ServerConfig, ServerError};

use crate::common::*;

async fn write_history(kv: &consul_kv::ConsulKv) {
    kv.put("vol/1", b"one").await.unwrap();
    kv.put("vol/2", &[0, 1, 2]).await.unwrap();
    kv.put_with_flags("vol/3", b"three", 9).await.unwrap();
    kv.txn(&[
        TxnOp::Set {
            key: "meta/a".into(),
            value: b"a".to_vec(),
            flags: 0,
        },
        TxnOp::Delete {
            key: "vol/2".into(),
        },
    ])
    .await
    .unwrap();
    kv.delete("vol/3").await.unwrap();
}

async fn restart_keeps_everything(compact_log_bytes: u64) {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut config = ServerConfig::loopback().with_data_dir(dir.path());
        config.compact_log_bytes = compact_log_bytes;
        config
    };
    let server = start_with(config()).await;
    let kv = client(&server);
    write_history(&kv).await;
    let all_before = kv.get_recurse("").await.unwrap();
    let vol_before = kv.get_recurse("vol/").await.unwrap();
    let deleted_before = kv.get("vol/3").await.unwrap();
    server.shutdown().await.unwrap();

    let server = start_with(config()).await;
    let kv = client(&server);
    let all_after = kv.get_recurse("").await.unwrap();
    assert_eq!(all_after, all_before);
    let vol_after = kv.get_recurse("vol/").await.unwrap();
    assert_eq!(
        vol_after.index, vol_before.index,
        "tombstones survive a restart"
    );
    assert_eq!(kv.get("vol/3").await.unwrap().index, deleted_before.index);
    kv.put("after", b"restart").await.unwrap();
    let next = kv.get("after").await.unwrap().index;
    assert_eq!(next, all_before.index + 1, "the index continues");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn restart_from_the_log() {
    restart_keeps_everything(u64::MAX).await;
}

#[tokio::test]
async fn restart_from_snapshots() {
    // Compacts after every write.
    restart_keeps_everything(1).await;
}

#[tokio::test]
async fn a_data_dir_serves_one_server_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let first = start_with(ServerConfig::loopback().with_data_dir(dir.path())).await;
    let second =
        consul_kv_server::Server::start(ServerConfig::loopback().with_data_dir(dir.path())).await;
    assert!(matches!(second, Err(ServerError::Data(_))), "{second:?}");
    first.shutdown().await.unwrap();
    let third = start_with(ServerConfig::loopback().with_data_dir(dir.path())).await;
    third.shutdown().await.unwrap();
}

//! `PUT /v1/txn`: atomicity, one index, results and the 409 body.

use consul_kv::{Error, TxnOp};
use serde_json::json;

use crate::common::*;

fn set(key: &str, value: &[u8]) -> TxnOp {
    TxnOp::Set {
        key: key.into(),
        value: value.to_vec(),
        flags: 0,
    }
}

#[tokio::test]
async fn results_share_one_index_and_later_ops_see_earlier_ones() {
    let server = start().await;
    let kv = client(&server);
    kv.put("pre/old", b"x").await.unwrap();
    let results = kv
        .txn(&[
            set("t/a", b"1"),
            set("t/b", b"2"),
            TxnOp::Get { key: "t/a".into() },
            TxnOp::GetTree {
                prefix: "t/".into(),
            },
            TxnOp::Delete {
                key: "pre/old".into(),
            },
            TxnOp::CheckNotExists {
                key: "pre/old".into(),
            },
        ])
        .await
        .unwrap();
    // set, set, get, get-tree (2 keys); delete and check-not-exists give none.
    assert_eq!(results.len(), 5);
    let index = results[0].kv.modify_index;
    assert!(results.iter().all(|r| r.kv.modify_index == index));
    assert!(results[0].kv.value.is_empty(), "set results carry no value");
    assert_eq!(results[2].kv.value, b"1", "get sees the earlier set");
    assert_eq!(results[3].kv.key, "t/a");
    assert_eq!(results[4].kv.key, "t/b");
    // The txn's index is the new ModifyIndex a later CAS can use.
    assert!(kv.put_cas("t/a", b"3", index).await.unwrap());
    assert!(kv.get("pre/old").await.unwrap().value.is_none());
}

#[tokio::test]
async fn a_failing_check_writes_nothing_and_every_failure_is_listed() {
    let server = start().await;
    let kv = client(&server);
    kv.put("a", b"1").await.unwrap();
    let before = kv.get_recurse("").await.unwrap();
    let error = kv
        .txn(&[
            set("new/1", b"x"),
            TxnOp::CheckIndex {
                key: "a".into(),
                index: 999,
            },
            TxnOp::Delete { key: "a".into() },
            TxnOp::Get {
                key: "missing".into(),
            },
            TxnOp::Cas {
                key: "a".into(),
                value: b"2".to_vec(),
                flags: 0,
                index: 0,
            },
        ])
        .await
        .unwrap_err();
    let failures = error.txn_failures().expect("a txn conflict");
    let failing: Vec<usize> = failures.iter().map(|f| f.op_index).collect();
    // The create-only cas (op 4) succeeds: op 2 deleted `a` before it.
    assert_eq!(failing, [1, 3]);
    assert!(
        failures[0].what.contains("failed index check"),
        "{}",
        failures[0].what
    );
    assert!(matches!(error, Error::TxnConflict { .. }));
    let after = kv.get_recurse("").await.unwrap();
    assert_eq!(after.value, before.value, "nothing written");
    assert_eq!(after.index, before.index, "no index consumed");
}

#[tokio::test]
async fn conflict_body_shape_over_raw_http() {
    let server = start().await;
    let body = json!([
        {"KV": {"Verb": "check-not-exists", "Key": "free"}},
        {"KV": {"Verb": "cas", "Key": "k", "Value": "eA==", "Index": 5}},
        {"KV": {"Verb": "delete-cas", "Key": "free", "Index": 3}},
    ]);
    let answer = http()
        .put(url(&server, "/v1/txn"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 409);
    let parsed: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(
        parsed,
        json!({"Results": null, "Errors": [
            {"OpIndex": 1, "What": "failed to set key \"k\", index is stale"}
        ]})
    );
}

#[tokio::test]
async fn success_body_shape_over_raw_http() {
    let server = start().await;
    let body = json!([
        {"KV": {"Verb": "set", "Key": "k", "Value": "aGk=", "Flags": 3}},
        {"KV": {"Verb": "get", "Key": "k"}},
        {"kv": {"verb": "get-or-empty", "key": "nothing"}},
    ]);
    let answer = http()
        .put(url(&server, "/v1/txn"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let parsed: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(parsed["Errors"], serde_json::Value::Null);
    let results = parsed["Results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[0]["KV"]["Value"], serde_json::Value::Null);
    assert_eq!(results[0]["KV"]["Flags"], 3);
    assert_eq!(results[1]["KV"]["Value"], "aGk=");
    assert_eq!(results[2]["KV"]["Key"], "nothing");
    assert_eq!(results[2]["KV"]["Value"], serde_json::Value::Null);
}

#[tokio::test]
async fn limits_and_bad_bodies() {
    let server = start().await;
    let put = |body: Vec<u8>| {
        let request = http().put(url(&server, "/v1/txn")).body(body);
        async move { request.send().await.unwrap().status() }
    };
    let op = json!({"KV": {"Verb": "get-or-empty", "Key": "k"}});
    let at_limit = serde_json::to_vec(&vec![op.clone(); 128]).unwrap();
    assert_eq!(put(at_limit).await, 200);
    let over = serde_json::to_vec(&vec![op; 129]).unwrap();
    assert_eq!(put(over).await, 413);
    assert_eq!(put(b"[{".to_vec()).await, 400);
    assert_eq!(put(b"{}".to_vec()).await, 400, "must be an array");
    assert_eq!(
        put(br#"[{"KV":{"Verb":"set","Key":"k","Value":"not base64!"}}]"#.to_vec()).await,
        400
    );
    let get = http().get(url(&server, "/v1/txn")).send().await.unwrap();
    assert_eq!(get.status(), 405);
}

#[tokio::test]
async fn unsupported_verbs_fail_their_operation_clearly() {
    let server = start().await;
    let body = json!([
        {"KV": {"Verb": "lock", "Key": "k", "Session": "abc"}},
        {"KV": {"Verb": "frobnicate", "Key": "k"}},
        {"Node": {"Verb": "get", "Node": {"Node": "n1"}}},
        {"KV": {"Verb": "set", "Key": "", "Value": "eA=="}},
    ]);
    let answer = http()
        .put(url(&server, "/v1/txn"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 409);
    let parsed: serde_json::Value = answer.json().await.unwrap();
    let whats: Vec<&str> = parsed["Errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["What"].as_str().unwrap())
        .collect();
    assert_eq!(whats.len(), 4);
    assert!(whats[0].contains("sessions"), "{}", whats[0]);
    assert_eq!(whats[1], "unknown KV verb \"frobnicate\"");
    assert!(whats[2].contains("only KV"));
    assert_eq!(whats[3], "Must provide key");
}

#[tokio::test]
async fn txn_writes_wake_watchers_and_cas_create_only() {
    let server = start().await;
    let kv = client(&server);
    let cas_create = |key: &str| TxnOp::Cas {
        key: key.into(),
        value: b"v".to_vec(),
        flags: 0,
        index: 0,
    };
    kv.txn(&[cas_create("c/1")]).await.unwrap();
    let error = kv.txn(&[cas_create("c/1")]).await.unwrap_err();
    assert_eq!(error.txn_failures().unwrap()[0].op_index, 0);
    let index = kv.get("c/1").await.unwrap().index;
    kv.txn(&[TxnOp::DeleteCas {
        key: "c/1".into(),
        index,
    }])
    .await
    .unwrap();
    let gone = kv.get_recurse("c/").await.unwrap();
    assert!(gone.value.is_empty());
    assert!(gone.index > index, "delete in a txn leaves a tombstone");
}

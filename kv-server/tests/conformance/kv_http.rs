//! `/v1/kv` over raw HTTP: shapes, headers and status codes.

use crate::common::*;

#[tokio::test]
async fn entry_json_is_exactly_consuls() {
    let server = start().await;
    let put = put_raw(&server, "/v1/kv/vol/1?flags=42", &[0xff, 0x00, b'a']).await;
    assert_eq!(put.status(), 200);
    assert!(
        put.headers().get("X-Consul-Index").is_none(),
        "writes carry no index"
    );
    assert_eq!(put.text().await.unwrap().trim(), "true");

    let get = get_raw(&server, "/v1/kv/vol/1").await;
    assert_eq!(get.status(), 200);
    assert_eq!(get.headers()["X-Consul-KnownLeader"], "true");
    assert_eq!(get.headers()["X-Consul-LastContact"], "0");
    let index = index_of(&get);
    let body = get.text().await.unwrap();
    assert_eq!(
        body,
        format!(
            r#"[{{"LockIndex":0,"Key":"vol/1","Flags":42,"Value":"/wBh","CreateIndex":{index},"ModifyIndex":{index}}}]"#
        )
    );
}

#[tokio::test]
async fn empty_value_is_null() {
    let server = start().await;
    put_raw(&server, "/v1/kv/empty", b"").await;
    let body: serde_json::Value = get_raw(&server, "/v1/kv/empty").await.json().await.unwrap();
    assert_eq!(body[0]["Value"], serde_json::Value::Null);
}

#[tokio::test]
async fn missing_key_is_404_with_index_never_zero() {
    let server = start().await;
    let missing = get_raw(&server, "/v1/kv/nothing").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(
        index_of(&missing),
        1,
        "an empty store answers index 1, not 0"
    );
    assert_eq!(missing.headers()["X-Consul-KnownLeader"], "true");

    put_raw(&server, "/v1/kv/a", b"1").await;
    put_raw(&server, "/v1/kv/b", b"2").await;
    let missing = get_raw(&server, "/v1/kv/vol/?recurse").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(index_of(&missing), 3, "no match: the table's index");
}

#[tokio::test]
async fn recurse_is_a_presence_flag_and_a_plain_prefix() {
    let server = start().await;
    for key in ["vol/1", "vol/10", "vol/1/snap", "vol/2"] {
        put_raw(&server, &format!("/v1/kv/{key}"), key.as_bytes()).await;
    }
    let keys_of = |body: serde_json::Value| -> Vec<String> {
        body.as_array()
            .unwrap()
            .iter()
            .map(|e| e["Key"].as_str().unwrap().to_owned())
            .collect()
    };
    let single: serde_json::Value = get_raw(&server, "/v1/kv/vol/1").await.json().await.unwrap();
    assert_eq!(keys_of(single), ["vol/1"]);
    for query in ["?recurse", "?recurse=false", "?recurse=0"] {
        let listed: serde_json::Value = get_raw(&server, &format!("/v1/kv/vol/1{query}"))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            keys_of(listed),
            ["vol/1", "vol/1/snap", "vol/10"],
            "{query}"
        );
    }
}

#[tokio::test]
async fn prefix_index_is_the_highest_under_the_prefix() {
    let server = start().await;
    // Writes start at index 2: 1 is what an empty store answers.
    put_raw(&server, "/v1/kv/vol/a", b"1").await; // 2
    put_raw(&server, "/v1/kv/vol/b", b"2").await; // 3
    put_raw(&server, "/v1/kv/other", b"3").await; // 4
    assert_eq!(index_of(&get_raw(&server, "/v1/kv/vol/?recurse").await), 3);
    assert_eq!(index_of(&get_raw(&server, "/v1/kv/vol/a").await), 2);
    delete_raw(&server, "/v1/kv/vol/b").await; // 5
    let after_delete = get_raw(&server, "/v1/kv/vol/?recurse").await;
    assert_eq!(
        index_of(&after_delete),
        5,
        "a delete raises the prefix index"
    );
    let missing = get_raw(&server, "/v1/kv/vol/b").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(index_of(&missing), 5);
}

#[tokio::test]
async fn keys_with_and_without_separator() {
    let server = start().await;
    let root = get_raw(&server, "/v1/kv/?keys").await;
    assert_eq!(root.status(), 200, "the root lists as []");
    assert_eq!(root.text().await.unwrap(), "[]");
    for key in ["v/a/1", "v/a/2", "v/b", "w"] {
        put_raw(&server, &format!("/v1/kv/{key}"), b"x").await;
    }
    let flat: Vec<String> = get_raw(&server, "/v1/kv/v/?keys")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(flat, ["v/a/1", "v/a/2", "v/b"]);
    let folders: Vec<String> = get_raw(&server, "/v1/kv/v/?keys&separator=/")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(folders, ["v/a/", "v/b"]);
    let none = get_raw(&server, "/v1/kv/zzz/?keys").await;
    assert_eq!(none.status(), 404);
    assert!(index_of(&none) >= 1);
}

#[tokio::test]
async fn raw_returns_the_bare_value() {
    let server = start().await;
    put_raw(&server, "/v1/kv/blob", &[1, 2, 3, 0xfe]).await;
    let raw = get_raw(&server, "/v1/kv/blob?raw").await;
    assert_eq!(raw.status(), 200);
    assert!(raw.headers().get("X-Consul-Index").is_some());
    assert_eq!(raw.bytes().await.unwrap().as_ref(), &[1, 2, 3, 0xfe]);
}

#[tokio::test]
async fn cas_put_and_delete() {
    let server = start().await;
    let answer = |r: reqwest::Response| async move { r.text().await.unwrap().trim().to_owned() };
    assert_eq!(
        answer(put_raw(&server, "/v1/kv/k?cas=0", b"1").await).await,
        "true"
    );
    assert_eq!(
        answer(put_raw(&server, "/v1/kv/k?cas=0", b"2").await).await,
        "false"
    );
    let index = index_of(&get_raw(&server, "/v1/kv/k").await);
    assert_eq!(
        answer(put_raw(&server, &format!("/v1/kv/k?cas={}", index + 7), b"3").await).await,
        "false"
    );
    assert_eq!(
        answer(put_raw(&server, &format!("/v1/kv/k?cas={index}"), b"4").await).await,
        "true"
    );
    let body: serde_json::Value = get_raw(&server, "/v1/kv/k").await.json().await.unwrap();
    assert_eq!(body[0]["Value"], "NA=="); // "4"
    let current = body[0]["ModifyIndex"].as_u64().unwrap();
    assert_eq!(
        answer(delete_raw(&server, "/v1/kv/k?cas=1").await).await,
        "false"
    );
    assert_eq!(
        answer(delete_raw(&server, &format!("/v1/kv/k?cas={current}")).await).await,
        "true"
    );
    assert_eq!(get_raw(&server, "/v1/kv/k").await.status(), 404);
    assert_eq!(
        answer(delete_raw(&server, "/v1/kv/k?cas=99").await).await,
        "true",
        "missing key"
    );
}

#[tokio::test]
async fn identical_put_keeps_modify_index() {
    let server = start().await;
    put_raw(&server, "/v1/kv/same", b"v").await;
    let before = index_of(&get_raw(&server, "/v1/kv/same").await);
    put_raw(&server, "/v1/kv/same", b"v").await;
    assert_eq!(index_of(&get_raw(&server, "/v1/kv/same").await), before);
    put_raw(&server, "/v1/kv/same?flags=1", b"v").await;
    assert!(
        index_of(&get_raw(&server, "/v1/kv/same").await) > before,
        "flags count"
    );
}

#[tokio::test]
async fn missing_key_delete_changes_nothing() {
    let server = start().await;
    put_raw(&server, "/v1/kv/a", b"1").await;
    let before = index_of(&get_raw(&server, "/v1/kv/?recurse").await);
    let deleted = delete_raw(&server, "/v1/kv/never").await;
    assert_eq!(deleted.status(), 200);
    assert_eq!(deleted.text().await.unwrap().trim(), "true");
    assert_eq!(index_of(&get_raw(&server, "/v1/kv/?recurse").await), before);
}

#[tokio::test]
async fn delete_recurse_is_a_plain_prefix() {
    let server = start().await;
    for key in ["vol/1", "vol/10", "vol/2"] {
        put_raw(&server, &format!("/v1/kv/{key}"), b"x").await;
    }
    delete_raw(&server, "/v1/kv/vol/1").await;
    assert_eq!(
        get_raw(&server, "/v1/kv/vol/10").await.status(),
        200,
        "single delete"
    );
    delete_raw(&server, "/v1/kv/vol/1?recurse").await;
    assert_eq!(get_raw(&server, "/v1/kv/vol/10").await.status(), 404);
    assert_eq!(get_raw(&server, "/v1/kv/vol/2").await.status(), 200);
}

#[tokio::test]
async fn value_size_limit_is_512_kib() {
    let server = start().await;
    let limit = 512 * 1024;
    let at_limit = put_raw(&server, "/v1/kv/big", &vec![7u8; limit]).await;
    assert_eq!(at_limit.status(), 200);
    let over = put_raw(&server, "/v1/kv/big", &vec![7u8; limit + 1]).await;
    assert_eq!(over.status(), 413);
    let stored: serde_json::Value = get_raw(&server, "/v1/kv/big").await.json().await.unwrap();
    assert_eq!(
        stored[0]["Value"].as_str().unwrap().len(),
        limit / 3 * 4 + 4
    );
}

#[tokio::test]
async fn conflicting_and_unsupported_flags() {
    let server = start().await;
    assert_eq!(
        put_raw(&server, "/v1/kv/k?cas=0&acquire=s", b"")
            .await
            .status(),
        400
    );
    assert_eq!(
        put_raw(&server, "/v1/kv/k?acquire=s&release=s", b"")
            .await
            .status(),
        400
    );
    assert_eq!(
        delete_raw(&server, "/v1/kv/k?recurse&cas=1").await.status(),
        400
    );
    let acquire = put_raw(&server, "/v1/kv/k?acquire=session-id", b"").await;
    assert_eq!(acquire.status(), 501, "sessions are not implemented");
    assert_eq!(
        get_raw(&server, "/v1/kv/k").await.status(),
        404,
        "nothing written"
    );
}

#[tokio::test]
async fn malformed_requests_are_400() {
    let server = start().await;
    assert_eq!(get_raw(&server, "/v1/kv/a?index=x").await.status(), 400);
    assert_eq!(
        get_raw(&server, "/v1/kv/a?index=1&wait=soon")
            .await
            .status(),
        400
    );
    assert_eq!(
        get_raw(&server, "/v1/kv/").await.status(),
        400,
        "missing key name"
    );
    assert_eq!(put_raw(&server, "/v1/kv/", b"x").await.status(), 400);
    assert_eq!(
        put_raw(&server, "/v1/kv/a?flags=-1", b"x").await.status(),
        400
    );
    assert_eq!(delete_raw(&server, "/v1/kv/").await.status(), 400);
    let post = http().post(url(&server, "/v1/kv/a")).send().await.unwrap();
    assert_eq!(post.status(), 405);
}

#[tokio::test]
async fn percent_encoded_keys_round_trip() {
    let server = start().await;
    put_raw(&server, "/v1/kv/dir/with%20space%3Fq", b"v").await;
    let listed: Vec<String> = get_raw(&server, "/v1/kv/dir/?keys")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed, ["dir/with space?q"]);
}

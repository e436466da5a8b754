//! Answers that clients written for Consul rely on beyond KV: sessions
//! refused loudly, other datacenters refused, the agent and status
//! endpoints clients call at start-up, and a 413 a client can read.

use serde_json::Value as Json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use consul_kv_server::ServerConfig;

use crate::common::*;

#[tokio::test]
async fn sessions_answer_501_not_404() {
    let server = start().await;
    for (method, path) in [
        (reqwest::Method::PUT, "/v1/session/create"),
        (reqwest::Method::GET, "/v1/session/list"),
        (reqwest::Method::GET, "/v1/session/info/abc"),
        (reqwest::Method::PUT, "/v1/session/destroy/abc"),
        (reqwest::Method::PUT, "/v1/session/renew/abc"),
    ] {
        let answer = http()
            .request(method, url(&server, path))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 501, "{path}");
        let text = answer.text().await.unwrap();
        assert!(
            text.contains("Sessions are not supported"),
            "{path}: {text}"
        );
    }
}

#[tokio::test]
async fn another_datacenter_has_no_path() {
    let mut config = ServerConfig::loopback();
    config.datacenter = "ewr1".into();
    let server = start_with(config).await;
    assert_eq!(put_raw(&server, "/v1/kv/a", b"1").await.status(), 200);
    for path in ["/v1/kv/a?dc=dc1", "/v1/kv/?recurse&dc=other"] {
        let answer = get_raw(&server, path).await;
        assert_eq!(answer.status(), 500, "{path}");
        assert_eq!(
            answer.text().await.unwrap(),
            "No path to datacenter",
            "{path}"
        );
    }
    let write = put_raw(&server, "/v1/kv/a?dc=dc1", b"2").await;
    assert_eq!(write.status(), 500);
    let txn = put_raw(&server, "/v1/txn?dc=dc9", b"[]").await;
    assert_eq!(txn.status(), 500);
    let local = get_raw(&server, "/v1/kv/a?dc=ewr1").await;
    assert_eq!(local.status(), 200);
    let local: Json = local.json().await.unwrap();
    assert_eq!(
        local[0]["Value"], "MQ==",
        "the refused write changed nothing"
    );
}

#[tokio::test]
async fn agent_self_and_status_answer_like_a_single_server() {
    let server = start().await;
    let agent: Json = get_raw(&server, "/v1/agent/self")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(agent["Config"]["Datacenter"], "dc1");
    assert_eq!(agent["Config"]["Server"], true);
    assert!(agent["Config"]["NodeName"]
        .as_str()
        .is_some_and(|n| !n.is_empty()));
    assert!(agent["Member"]["Name"].is_string());
    let address = server.local_addr().to_string();
    let peers: Json = get_raw(&server, "/v1/status/peers")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(peers, serde_json::json!([address]));
    let leader: Json = get_raw(&server, "/v1/status/leader")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(leader, serde_json::json!(address));
}

/// A client that sends its whole oversized body before it reads the answer
/// (as most do) must read a 413, not fail on a reset connection.
#[tokio::test]
async fn an_oversized_put_gets_its_413_without_a_broken_pipe() {
    let server = start().await;
    let body = vec![b'x'; 6 * 1024 * 1024];
    for _ in 0..5 {
        let mut socket = tokio::net::TcpStream::connect(server.local_addr())
            .await
            .unwrap();
        let head = format!(
            "PUT /v1/kv/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        socket
            .write_all(&body)
            .await
            .expect("the server reads the body it refuses");
        let mut answer = Vec::new();
        within(
            std::time::Duration::from_secs(10),
            socket.read_to_end(&mut answer),
        )
        .await
        .expect("the answer arrives, no reset");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
    let through_reqwest = put_raw(&server, "/v1/kv/big", &vec![b'y'; 6 * 1024 * 1024]).await;
    assert_eq!(through_reqwest.status(), 413);
    assert_eq!(get_raw(&server, "/v1/kv/big").await.status(), 404);
}

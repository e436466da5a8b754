//! Bounds on what clients can hold or grow: half-sent requests, unfinished
//! bodies at shutdown, key length.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};

use consul_kv::TxnOp;

use crate::common::*;

/// `volkv` under `prlimit`, so its file limit is the test's.
async fn spawn_limited(nofile: u32, args: &[&str]) -> (Child, String) {
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_volkv"))
        .args(["--bind", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prlimit and volkv start");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = within(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .expect("volkv prints its address");
    let url = line
        .strip_prefix("volkv listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (child, url)
}

fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn half_sent_requests_do_not_starve_others() {
    let (child, url) = spawn_limited(200, &["--header-read-timeout", "2s"]).await;
    let addr = addr_of(&url);
    // More connections than the server may have files, each stopping in
    // the middle of its request head.
    let mut held = Vec::new();
    for _ in 0..250 {
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
        socket
            .write_all(b"GET /v1/kv/a HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(socket);
    }
    let kv = client_at(&url, None);
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match kv.put("after", b"flood").await {
                Ok(written) => return written,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .expect("a well-behaved client is served despite the half-sent requests");
    assert!(answer);
    assert!(started.elapsed() < Duration::from_secs(15));
    drop(held);
    drop(child);
}

#[tokio::test]
async fn an_unfinished_put_body_does_not_hold_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (mut child, url) =
        spawn_limited(1024, &["--data-dir", data, "--shutdown-deadline", "1s"]).await;
    let mut socket = tokio::net::TcpStream::connect(addr_of(&url)).await.unwrap();
    socket
        .write_all(b"PUT /v1/kv/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("volkv stops within its shutdown deadline")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "{:?}",
        stopping.elapsed()
    );
    // The data directory is free again.
    let (again, url) = spawn_limited(1024, &["--data-dir", data]).await;
    assert!(client_at(&url, None)
        .get("slow")
        .await
        .unwrap()
        .value
        .is_none());
    drop(again);
    drop(socket);
}

#[tokio::test]
async fn a_key_over_the_limit_is_refused_with_400() {
    let server = start().await;
    let longest = "k".repeat(consul_kv_server::MAX_KEY_BYTES);
    let over = "k".repeat(consul_kv_server::MAX_KEY_BYTES + 1);
    assert_eq!(
        put_raw(&server, &format!("/v1/kv/{longest}"), b"1")
            .await
            .status(),
        200
    );
    let refused = put_raw(&server, &format!("/v1/kv/{over}"), b"1").await;
    assert_eq!(refused.status(), 400);
    let text = refused.text().await.unwrap();
    assert!(
        text.contains("Key too long") && text.contains("512"),
        "{text}"
    );
    assert_eq!(
        get_raw(&server, &format!("/v1/kv/{over}")).await.status(),
        400
    );
    let kv = client(&server);
    let txn = kv
        .txn(&[TxnOp::Set {
            key: over.clone(),
            value: b"1".to_vec(),
            flags: 0,
        }])
        .await;
    assert!(txn.is_err(), "{txn:?}");
    let all = kv.get_recurse("").await.unwrap().value;
    assert_eq!(all.len(), 1, "only the key at the limit was written");
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_408() {
    use tokio::io::AsyncReadExt as _;
    let mut config = consul_kv_server::ServerConfig::loopback();
    config.body_read_timeout = Duration::from_millis(500);
    let server = start_with(config).await;
    let mut socket = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    socket
        .write_all(b"PUT /v1/kv/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut answer = Vec::new();
    within(Duration::from_secs(5), socket.read_to_end(&mut answer))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("Request body not received within"),
        "{answer}"
    );
    assert_eq!(get_raw(&server, "/v1/kv/slow").await.status(), 404);
}

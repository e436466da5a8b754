//! The `volkv` binary: prints its address, serves, stops on SIGTERM, keeps
//! its data.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::common::*;

async fn spawn_volkv(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_volkv"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("volkv starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("volkv prints its address")
        .unwrap()
        .expect("a line");
    let url = line
        .strip_prefix("volkv listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (child, url)
}

async fn stop(mut child: Child, signal: Signal) {
    let pid = Pid::from_raw(child.id().unwrap() as i32);
    kill(pid, signal).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("volkv stops")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn serves_stops_on_signals_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (child, url) = spawn_volkv(&["--bind", "127.0.0.1:0", "--data-dir", data]).await;
    let kv = client_at(&url, None);
    kv.put("vol/1", b"kept").await.unwrap();
    stop(child, Signal::SIGTERM).await;

    let (child, url) = spawn_volkv(&["--bind", "127.0.0.1:0", "--data-dir", data]).await;
    let kv = client_at(&url, None);
    assert_eq!(kv.get("vol/1").await.unwrap().value.unwrap().value, b"kept");
    stop(child, Signal::SIGINT).await;
}

#[tokio::test]
async fn acl_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# operators\nfirst-token\n\nsecond-token\n").unwrap();
    let (child, url) = spawn_volkv(&[
        "--bind",
        "127.0.0.1:0",
        "--acl-token-file",
        tokens.to_str().unwrap(),
    ])
    .await;
    assert!(client_at(&url, Some("second-token"))
        .put("k", b"v")
        .await
        .unwrap());
    assert!(client_at(&url, None).get("k").await.is_err());
    stop(child, Signal::SIGTERM).await;
}

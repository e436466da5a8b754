//! The binary itself, where exit codes, streams and the terminal matter.

use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use consul_kv::SecretToken;
use consul_kv_server::{Server, ServerConfig};

use crate::common::{self, host, Env, GB};
use volume_model::names::VolumeId;

const CONSUL_VARS: [&str; 5] = [
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "CONSUL_HTTP_SSL",
    "CONSUL_CACERT",
];

/// Runs the binary with stdin from nowhere (not a terminal) and only the
/// given Consul variables.
async fn volctl(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_volctl"));
    for name in CONSUL_VARS {
        command.env_remove(name);
    }
    command
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("volctl finishes")
        .expect("volctl runs")
}

async fn volctl_at(env: &Env, args: &[&str]) -> Output {
    volctl(&[("CONSUL_HTTP_ADDR", &env.server.url())], args).await
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn ewr_hosts() -> Env {
    let env = common::start().await;
    env.publish(&host("h1", "ewr", "a", GB)).await;
    env.publish(&host("h2", "ewr", "b", 1_200_000_000)).await;
    env.publish(&host("h3", "ewr", "c", GB / 2)).await;
    env
}

#[tokio::test]
async fn destroy_without_yes_on_a_pipe_refuses_and_changes_nothing() {
    let env = ewr_hosts().await;
    let output = volctl_at(
        &env,
        &[
            "create", "data", "--size", "2", "--region", "ewr", "--detach", "--json",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let id = common::created_ids(&text(&output.stdout))[0].to_string();

    let output = volctl_at(&env, &["destroy", &id]).await;
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        text(&output.stderr).trim(),
        format!(
            "volctl: destroying {id} deletes its data: pass --yes (there is no terminal to ask on)"
        )
    );
    assert!(!env.spec(&id).await.destroy);
}

#[tokio::test]
async fn create_without_a_host_daemon_times_out_with_exit_4() {
    let env = ewr_hosts().await;
    let started = Instant::now();
    let output = volctl_at(
        &env,
        &[
            "create",
            "data",
            "--size",
            "2",
            "--region",
            "ewr",
            "--timeout",
            "1",
        ],
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(output.status.code(), Some(4));
    assert!(output.stdout.is_empty());
    let stderr = text(&output.stderr);
    let id = env.specs().await[0].id.to_string();
    let lines: Vec<&str> = stderr.lines().collect();
    // Not a terminal: a plain progress line, then the error.
    assert_eq!(lines[0], format!("{id} on h2: no status yet (0s)"));
    assert_eq!(
        *lines.last().unwrap(),
        format!(
            "volctl: gave up after 1s waiting for {id} on h2 to become ready; last state: no status yet \
             (is volumed running on h2?); the request stays recorded: see `volctl show {id}`"
        )
    );
}

#[tokio::test]
async fn a_full_region_exits_3_with_the_reason_per_host() {
    let env = ewr_hosts().await;
    let output = volctl_at(&env, &["create", "data", "--size", "25", "--region", "ewr"]).await;
    assert_eq!(output.status.code(), Some(3));
    let stderr = text(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines[0],
        "volctl: no host in ewr can take 25 GB: 3 hosts, most headroom 12 GB (h2)"
    );
    assert_eq!(lines.len(), 4, "{stderr}");
    assert_eq!(
        lines[2],
        "  h2: over-commit: 25 GB requested, 12 GB headroom at ratio 10"
    );
    assert!(env.specs().await.is_empty());
}

#[tokio::test]
async fn json_and_tables_go_to_stdout() {
    let env = ewr_hosts().await;
    let output = volctl_at(
        &env,
        &[
            "create", "data", "--size", "3", "--region", "ewr", "--detach", "--json",
        ],
    )
    .await;
    assert_eq!(output.status.code(), Some(0));
    let created: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let id = created[0]["id"].as_str().unwrap().to_owned();
    assert!(output.stderr.is_empty(), "{}", text(&output.stderr));

    for args in [
        &["list", "--json"][..],
        &["hosts", "--json"],
        &["show", &id, "--json"],
    ] {
        let output = volctl_at(&env, args).await;
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
    let output = volctl_at(&env, &["show", &id]).await;
    let shown = text(&output.stdout);
    let row = |key: &str, value: &str| {
        shown
            .lines()
            .any(|line| line.split_whitespace().collect::<Vec<_>>() == [key, value])
    };
    assert!(row("id", &id), "{shown}");
    assert!(row("state", "pending"), "{shown}");
}

#[tokio::test]
async fn usage_not_found_and_unreachable_have_their_codes() {
    let env = ewr_hosts().await;
    for (args, code) in [
        (&["create", "data", "--size", "0", "--region", "ewr"][..], 2),
        (
            &["create", "data", "--size", "99999999999", "--region", "ewr"],
            2,
        ),
        (&["show", "not-an-id"], 2),
        (&["destroy"], 2),
        (&["show", "vol_0000000000000000"], 5),
        (&["destroy", "vol_0000000000000000", "--yes"], 5),
    ] {
        let output = volctl_at(&env, args).await;
        assert_eq!(
            output.status.code(),
            Some(code),
            "{args:?}: {}",
            text(&output.stderr)
        );
        assert!(!output.stderr.is_empty());
    }
    let output = volctl(&[("CONSUL_HTTP_ADDR", "127.0.0.1:1")], &["list"]).await;
    assert_eq!(output.status.code(), Some(6), "{}", text(&output.stderr));
    assert!(text(&output.stderr).starts_with("volctl: cannot reach the KV store"));

    // --kv-addr wins over the environment.
    let output = volctl(
        &[("CONSUL_HTTP_ADDR", "127.0.0.1:1")],
        &["--kv-addr", &env.server.url(), "list"],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));

    let output = volctl(&[], &["--help"]).await;
    assert_eq!(output.status.code(), Some(0));
    assert!(text(&output.stdout).contains("5  not found"));
    let output = volctl(&[], &["completions", "bash"]).await;
    assert_eq!(output.status.code(), Some(0));
    assert!(text(&output.stdout).contains("volctl"));
}

#[tokio::test]
async fn the_token_is_sent_but_never_printed() {
    let server = Server::start(
        ServerConfig::loopback().with_acl_tokens([SecretToken::new("right-token-4242")]),
    )
    .await
    .unwrap();
    let address = server.url();
    let wrong = "wrong-token-1717";
    let output = volctl(
        &[("CONSUL_HTTP_ADDR", &address), ("CONSUL_HTTP_TOKEN", wrong)],
        &["hosts"],
    )
    .await;
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("ACL denied"), "{stderr}");
    assert!(!stderr.contains(wrong) && !text(&output.stdout).contains(wrong));

    let output = volctl(
        &[
            ("CONSUL_HTTP_ADDR", &address),
            ("CONSUL_HTTP_TOKEN", "right-token-4242"),
        ],
        &["hosts"],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(!text(&output.stdout).contains("right-token-4242"));
}

#[tokio::test]
async fn hosts_shows_each_hosts_orphans() {
    let env = common::start().await;
    let mut record = host("h1", "ewr", "a", GB);
    record.orphans = vec![
        VolumeId::new("vol_0000000000000001").unwrap(),
        VolumeId::new("vol_0000000000000002").unwrap(),
    ];
    env.publish(&record).await;
    env.publish(&host("h2", "ewr", "b", GB)).await;
    let output = volctl_at(&env, &["hosts"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let shown = text(&output.stdout);
    let lines: Vec<&str> = shown.lines().collect();
    // A right-aligned column: each cell ends where its header ends.
    let end = lines[0]
        .find("ORPHANS")
        .unwrap_or_else(|| panic!("no ORPHANS column: {shown}"))
        + "ORPHANS".len();
    let cell = |host: &str| {
        let row = lines.iter().find(|l| l.starts_with(host)).unwrap();
        row[..end].split_whitespace().last().unwrap().to_owned()
    };
    assert_eq!(cell("h1"), "2", "{shown}");
    assert_eq!(cell("h2"), "0", "{shown}");
}

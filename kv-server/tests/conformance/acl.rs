//! ACL tokens: `?token`, `X-Consul-Token`, `Authorization: Bearer`.

use consul_kv::{Error, SecretToken, TxnOp};
use consul_kv_server::ServerConfig;

use crate::common::*;

const TOKEN: &str = "4f1c2d9e-acl-test-token";

async fn start_acl() -> consul_kv_server::ServerHandle {
    start_with(ServerConfig::loopback().with_acl_tokens([SecretToken::new(TOKEN)])).await
}

#[tokio::test]
async fn token_required_with_consuls_messages() {
    let server = start_acl().await;
    let anonymous = get_raw(&server, "/v1/kv/a").await;
    assert_eq!(anonymous.status(), 403);
    assert_eq!(anonymous.text().await.unwrap(), "Permission denied");
    let unknown = http()
        .get(url(&server, "/v1/kv/a"))
        .header("X-Consul-Token", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 403);
    assert_eq!(unknown.text().await.unwrap(), "ACL not found");
    let txn = http()
        .put(url(&server, "/v1/txn"))
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(txn.status(), 403);
}

#[tokio::test]
async fn every_token_source_is_accepted() {
    let server = start_acl().await;
    let by_query = get_raw(&server, &format!("/v1/kv/a?token={TOKEN}")).await;
    assert_eq!(by_query.status(), 404);
    let by_header = http()
        .get(url(&server, "/v1/kv/a"))
        .header("X-Consul-Token", TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(by_header.status(), 404);
    let by_bearer = http()
        .get(url(&server, "/v1/kv/a"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(by_bearer.status(), 404);
}

#[tokio::test]
async fn client_sends_its_token_and_reports_denial_without_it() {
    let server = start_acl().await;
    let allowed = client_at(&server.url(), Some(TOKEN));
    assert!(allowed.put("k", b"v").await.unwrap());
    assert_eq!(allowed.get("k").await.unwrap().value.unwrap().value, b"v");

    let wrong = client_at(&server.url(), Some("not-the-token-zzz"));
    let error = wrong.get("k").await.unwrap_err();
    assert!(matches!(&error, Error::AclDenied { message, .. } if message == "ACL not found"));
    assert!(!format!("{error} {error:?} {wrong:?}").contains("not-the-token-zzz"));
    let anonymous = client_at(&server.url(), None);
    assert!(matches!(
        anonymous.txn(&[]).await.unwrap_err(),
        Error::AclDenied { .. }
    ));
}

const H1: &str = "h1-volumed-token-0001";
const H2: &str = "h2-volumed-token-0002";
const OPERATOR: &str = "operator-token-0003";
const READER: &str = "read-only-token-0004";
const ADMIN: &str = "admin-token-0005";

/// The roles README documents, over the project's layout.
fn role_tokens() -> Vec<consul_kv_server::TokenRules> {
    let volumed = |host: &str| {
        format!(
            r#"
            key_prefix "volumes/v1/" {{ policy = "read" }}
            key_prefix "volumes/v1/hosts/{host}/" {{ policy = "write" }}
            key_prefix "volumes/v1/status/{host}/" {{ policy = "write" }}
            key_prefix "volumes/v1/desired/{host}/" {{ policy = "write" }}
            key_prefix "volumes/v1/keys/" {{ policy = "write" }}
            "#
        )
    };
    let token = |name: &str, secret: &str, rules: &str| consul_kv_server::TokenRules {
        name: name.into(),
        secret: SecretToken::new(secret),
        rules: consul_kv_server::Rules::parse(rules).unwrap(),
    };
    vec![
        token("volumed-h1", H1, &volumed("h1")),
        token("volumed-h2", H2, &volumed("h2")),
        token(
            "volctl",
            OPERATOR,
            r#"
            key_prefix "volumes/v1/" { policy = "read" }
            key_prefix "volumes/v1/desired/" { policy = "write" }
            key_prefix "volumes/v1/hosts/" { policy = "write" }
            "#,
        ),
        token(
            "read-only",
            READER,
            r#"key_prefix "volumes/v1/" { policy = "read" }"#,
        ),
        token("admin", ADMIN, r#"key_prefix "" { policy = "write" }"#),
    ]
}

async fn start_roles() -> consul_kv_server::ServerHandle {
    start_with(ServerConfig::loopback().with_acl(role_tokens())).await
}

fn denied(result: Result<impl std::fmt::Debug, Error>) {
    match result {
        Err(Error::AclDenied { message, .. }) => assert_eq!(message, "Permission denied"),
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[tokio::test]
async fn a_host_token_writes_only_its_own_records() {
    let server = start_roles().await;
    let h1 = client_at(&server.url(), Some(H1));
    let h2 = client_at(&server.url(), Some(H2));
    assert!(h1.put("volumes/v1/hosts/h1/info", b"{}").await.unwrap());
    assert!(h2.put("volumes/v1/hosts/h2/info", b"{}").await.unwrap());
    denied(h1.put("volumes/v1/hosts/h2/info", b"forged").await);
    denied(h1.delete("volumes/v1/status/h2/v1").await);
    denied(h1.delete_tree("volumes/v1/hosts/").await);
    // It still reads everything under the root.
    assert_eq!(
        h1.get("volumes/v1/hosts/h2/info")
            .await
            .unwrap()
            .value
            .unwrap()
            .value,
        b"{}"
    );
    denied(h1.get("elsewhere").await);
    // A txn is checked per operation: one foreign write refuses it all.
    let mixed = h1
        .txn(&[
            TxnOp::Set {
                key: "volumes/v1/status/h1/a".into(),
                value: b"ok".to_vec(),
                flags: 0,
            },
            TxnOp::Set {
                key: "volumes/v1/status/h2/a".into(),
                value: b"forged".to_vec(),
                flags: 0,
            },
        ])
        .await;
    match mixed {
        Err(Error::TxnConflict {
            failures: errors, ..
        }) => {
            assert_eq!(errors.len(), 1);
            assert_eq!(errors[0].op_index, 1);
            assert_eq!(errors[0].what, "Permission denied");
        }
        other => panic!("expected a per-op denial, got {other:?}"),
    }
    let operator = client_at(&server.url(), Some(OPERATOR));
    assert!(operator
        .get("volumes/v1/status/h1/a")
        .await
        .unwrap()
        .value
        .is_none());
    assert!(operator
        .get("volumes/v1/status/h2/a")
        .await
        .unwrap()
        .value
        .is_none());
}

#[tokio::test]
async fn a_read_only_token_cannot_write_at_all() {
    let server = start_roles().await;
    let operator = client_at(&server.url(), Some(OPERATOR));
    assert!(operator
        .put("volumes/v1/desired/h1/v1", b"spec")
        .await
        .unwrap());
    denied(operator.put("volumes/v1/status/h1/v1", b"forged").await);
    let reader = client_at(&server.url(), Some(READER));
    assert_eq!(
        reader.get_recurse("volumes/v1/").await.unwrap().value.len(),
        1
    );
    denied(reader.put("volumes/v1/desired/h1/v2", b"x").await);
    denied(reader.delete("volumes/v1/desired/h1/v1").await);
    denied(reader.delete_tree("volumes/v1/").await);
    assert!(matches!(
        reader
            .txn(&[TxnOp::CheckNotExists {
                key: "volumes/v1/desired/h1/v3".into()
            }])
            .await,
        Err(Error::TxnConflict { .. })
    ));
    // Reads in a txn are allowed.
    let read = reader
        .txn(&[TxnOp::Get {
            key: "volumes/v1/desired/h1/v1".into(),
        }])
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(
        operator
            .get("volumes/v1/desired/h1/v1")
            .await
            .unwrap()
            .value
            .unwrap()
            .value,
        b"spec"
    );
}

#[tokio::test]
async fn listing_shows_only_readable_keys() {
    let server = start_roles().await;
    let admin = client_at(&server.url(), Some(ADMIN));
    assert!(admin.put("volumes/v1/desired/h1/v1", b"a").await.unwrap());
    assert!(admin.put("other/secret", b"b").await.unwrap());
    let reader = client_at(&server.url(), Some(READER));
    let listed = reader.get_recurse("").await.unwrap();
    let keys: Vec<&str> = listed.value.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["volumes/v1/desired/h1/v1"]);
    assert_eq!(
        reader.keys("", None).await.unwrap().value,
        ["volumes/v1/desired/h1/v1"]
    );
    denied(reader.get("other/secret").await);
}

#[tokio::test]
async fn a_non_loopback_bind_without_acls_is_refused() {
    let open =
        consul_kv_server::Server::start(ServerConfig::new("0.0.0.0:0".parse().unwrap())).await;
    let error = open.expect_err("refused");
    let message = error.to_string();
    assert!(
        message.contains("0.0.0.0") && message.contains("ACL"),
        "{message}"
    );
    let guarded = consul_kv_server::Server::start(
        ServerConfig::new("0.0.0.0:0".parse().unwrap()).with_acl(role_tokens()),
    )
    .await
    .expect("with ACLs it may listen beyond loopback");
    guarded.shutdown().await.unwrap();
}

//! ACL tokens: `?token`, `X-Consul-Token`, `Authorization: Bearer`.

use consul_kv::{Error, SecretToken};
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

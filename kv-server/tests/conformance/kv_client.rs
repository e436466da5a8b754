//! The typed client against the bundled server.

use consul_kv::Error;

use crate::common::*;

#[tokio::test]
async fn get_put_delete_round_trip_with_binary_values() {
    let server = start().await;
    let kv = client(&server);
    let value = vec![0u8, 159, 146, 150, 255];
    assert!(kv.put("vol/1", &value).await.unwrap());
    let got = kv.get("vol/1").await.unwrap();
    let pair = got.value.expect("present");
    assert_eq!(pair.value, value);
    assert_eq!(got.index, pair.modify_index);
    assert!(got.known_leader);

    kv.delete("vol/1").await.unwrap();
    let missing = kv.get("vol/1").await.unwrap();
    assert!(missing.value.is_none());
    assert!(
        missing.index > got.index,
        "404 keeps the index (the delete's)"
    );
}

#[tokio::test]
async fn get_recurse_empty_prefix_is_empty_with_index() {
    let server = start().await;
    let kv = client(&server);
    kv.put("other", b"x").await.unwrap();
    let empty = kv.get_recurse("vol/").await.unwrap();
    assert!(empty.value.is_empty());
    assert!(empty.index >= 1);
}

#[tokio::test]
async fn get_is_not_recursive_but_get_recurse_is() {
    let server = start().await;
    let kv = client(&server);
    kv.put("vol/1", b"a").await.unwrap();
    kv.put("vol/10", b"b").await.unwrap();
    assert_eq!(kv.get("vol/1").await.unwrap().value.unwrap().value, b"a");
    let all = kv.get_recurse("vol/1").await.unwrap().value;
    assert_eq!(all.len(), 2);
    kv.delete("vol/1").await.unwrap();
    assert!(
        kv.get("vol/10").await.unwrap().value.is_some(),
        "delete is not recursive"
    );
    kv.delete_tree("vol/").await.unwrap();
    assert!(kv.get_recurse("vol/").await.unwrap().value.is_empty());
}

#[tokio::test]
async fn keys_listing() {
    let server = start().await;
    let kv = client(&server);
    for key in ["v/a/1", "v/a/2", "v/b"] {
        kv.put(key, b"").await.unwrap();
    }
    assert_eq!(
        kv.keys("v/", Some("/")).await.unwrap().value,
        ["v/a/", "v/b"]
    );
    assert_eq!(kv.keys("v/", None).await.unwrap().value.len(), 3);
    assert!(kv.keys("nope/", None).await.unwrap().value.is_empty());
}

#[tokio::test]
async fn cas_semantics() {
    let server = start().await;
    let kv = client(&server);
    assert!(
        kv.put_cas("lock", b"1", 0).await.unwrap(),
        "create-only succeeds once"
    );
    assert!(!kv.put_cas("lock", b"2", 0).await.unwrap());
    let index = kv.get("lock").await.unwrap().value.unwrap().modify_index;
    assert!(!kv.put_cas("lock", b"3", index + 1).await.unwrap());
    assert!(kv.put_cas("lock", b"4", index).await.unwrap());
    assert!(
        !kv.put_cas("lock", b"5", index).await.unwrap(),
        "index moved on"
    );
    let now = kv.get("lock").await.unwrap().value.unwrap();
    assert_eq!(now.value, b"4");
    assert!(!kv.delete_cas("lock", index).await.unwrap());
    assert!(kv.delete_cas("lock", now.modify_index).await.unwrap());
    assert!(kv.delete_cas("lock", 12345).await.unwrap(), "missing key");
    assert!(
        !kv.put_cas("never", b"x", 3).await.unwrap(),
        "cas>0 on a missing key"
    );
}

#[tokio::test]
async fn flags_are_kept() {
    let server = start().await;
    let kv = client(&server);
    kv.put_with_flags("f", b"v", u64::MAX).await.unwrap();
    assert_eq!(kv.get("f").await.unwrap().value.unwrap().flags, u64::MAX);
}

#[tokio::test]
async fn too_large_is_its_own_error() {
    let server = start().await;
    let kv = client(&server);
    let error = kv.put("big", &vec![0u8; 512 * 1024 + 1]).await.unwrap_err();
    assert!(matches!(error, Error::TooLarge { .. }), "{error:?}");
}

#[tokio::test]
async fn unreachable_server_is_a_transport_error_not_empty() {
    let server = start().await;
    let url = server.url();
    server.shutdown().await.unwrap();
    let kv = client_at(&url, None);
    let error = kv.get_recurse("vol/").await.unwrap_err();
    assert!(error.is_transport(), "{error:?}");
    assert!(kv.get("vol/1").await.unwrap_err().is_transport());
    assert!(kv.put("vol/1", b"x").await.unwrap_err().is_transport());
}

/// A canned HTTP answer and the check its error must pass.
type BadAnswerCase = (&'static str, fn(&Error) -> bool);

#[tokio::test]
async fn bad_answers_are_errors_never_empty_results() {
    let cases: [BadAnswerCase; 5] = [
        (
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom",
            |e| matches!(e, Error::Status { status: 500, body, .. } if body == "boom"),
        ),
        ("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", |e| {
            matches!(e, Error::Decode { .. })
        }),
        (
            "HTTP/1.1 200 OK\r\nX-Consul-Index: 5\r\nContent-Length: 5\r\n\r\n[{]}x",
            |e| matches!(e, Error::Decode { .. }),
        ),
        (
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 13\r\n\r\nACL not found",
            |e| matches!(e, Error::AclDenied { message, .. } if message == "ACL not found"),
        ),
        (
            "HTTP/1.1 200 OK\r\nX-Consul-Index: 0x1\r\nContent-Length: 2\r\n\r\n[]",
            |e| matches!(e, Error::Decode { .. }),
        ),
    ];
    for (answer, expected) in cases {
        let fake = FakeConsul::answering(answer).await;
        let kv = client_at(&fake.url, None);
        let error = kv.get_recurse("vol/").await.expect_err(answer);
        assert!(expected(&error), "{answer:?} gave {error:?}");
    }
}

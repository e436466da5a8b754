//! HTTPS with a private CA given by `CONSUL_CACERT`, as Consul clusters
//! usually run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use consul_kv::{ClientConfig, ConsulKv};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::common::within;

const ANSWER: &str = "HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nContent-Length: 2\r\n\r\n[]";

/// A TLS listener for `localhost` answering every request with `ANSWER`;
/// returns its port and the PEM of its (self-signed) certificate.
async fn tls_fake_consul() -> (u16, String, tokio::task::JoinHandle<()>) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tls.write_all(ANSWER.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, certified.cert.pem(), task)
}

fn client_from_env(vars: &[(&str, String)]) -> ConsulKv {
    let vars: HashMap<&str, String> = vars.iter().cloned().collect();
    let config = ClientConfig::from_lookup(|name| vars.get(name).cloned())
        .unwrap()
        .with_request_timeout(Duration::from_secs(5));
    ConsulKv::new(config).unwrap()
}

#[tokio::test]
async fn https_with_consul_cacert() {
    let (port, ca_pem, server) = tls_fake_consul().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca_pem).unwrap();
    let address = format!("localhost:{port}");

    let trusted = client_from_env(&[
        ("CONSUL_HTTP_ADDR", address.clone()),
        ("CONSUL_HTTP_SSL", "true".into()),
        ("CONSUL_CACERT", ca_path.to_str().unwrap().into()),
    ]);
    assert!(trusted.base_url().starts_with("https://"));
    let answer = within(Duration::from_secs(5), trusted.get_recurse("vol/"))
        .await
        .unwrap();
    assert_eq!(answer.index, 7);

    // Without the CA the certificate is unknown: a transport error.
    let untrusted = client_from_env(&[("CONSUL_HTTP_ADDR", format!("https://{address}"))]);
    let error = within(Duration::from_secs(5), untrusted.get_recurse("vol/"))
        .await
        .unwrap_err();
    assert!(error.is_transport(), "{error:?}");
    server.abort();
}

#[test]
fn unreadable_or_empty_ca_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    for path in [empty, dir.path().join("absent.pem")] {
        let config = ClientConfig::new("https://localhost:8501")
            .unwrap()
            .with_ca_cert(&path);
        let error = ConsulKv::new(config).unwrap_err();
        assert!(matches!(error, consul_kv::Error::Config(_)), "{error:?}");
    }
}

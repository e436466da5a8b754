//! Helpers: servers on loopback with free ports, clients, raw HTTP.

use std::time::Duration;

use consul_kv::{ClientConfig, ConsulKv, SecretToken};
use consul_kv_server::{Server, ServerConfig, ServerHandle};

/// Fails the test instead of hanging it.
pub async fn within<T>(limit: Duration, work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| panic!("no result within {limit:?}"))
}

/// An in-memory server on a free loopback port.
pub async fn start() -> ServerHandle {
    Server::start(ServerConfig::loopback())
        .await
        .expect("server starts")
}

pub async fn start_with(config: ServerConfig) -> ServerHandle {
    Server::start(config).await.expect("server starts")
}

pub fn client(server: &ServerHandle) -> ConsulKv {
    client_at(&server.url(), None)
}

pub fn client_at(url: &str, token: Option<&str>) -> ConsulKv {
    let mut config = ClientConfig::new(url)
        .expect("valid address")
        .with_request_timeout(Duration::from_secs(10));
    if let Some(token) = token {
        config = config.with_token(SecretToken::new(token));
    }
    ConsulKv::new(config).expect("client builds")
}

/// Raw HTTP, for what the client hides.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client builds")
}

pub fn url(server: &ServerHandle, path_and_query: &str) -> String {
    format!("{}{}", server.url(), path_and_query)
}

/// `X-Consul-Index` of an answer, which must be present.
pub fn index_of(response: &reqwest::Response) -> u64 {
    response
        .headers()
        .get("X-Consul-Index")
        .expect("X-Consul-Index header present")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

pub async fn put_raw(
    server: &ServerHandle,
    path_and_query: &str,
    body: &[u8],
) -> reqwest::Response {
    http()
        .put(url(server, path_and_query))
        .body(body.to_vec())
        .send()
        .await
        .expect("server answers")
}

pub async fn get_raw(server: &ServerHandle, path_and_query: &str) -> reqwest::Response {
    http()
        .get(url(server, path_and_query))
        .send()
        .await
        .expect("server answers")
}

pub async fn delete_raw(server: &ServerHandle, path_and_query: &str) -> reqwest::Response {
    http()
        .delete(url(server, path_and_query))
        .send()
        .await
        .expect("server answers")
}

/// A loopback listener answering every request with one canned HTTP answer
/// (for answers the real server never gives).
pub struct FakeConsul {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl FakeConsul {
    pub async fn answering(answer: &'static str) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    // Read the request head (GETs have no body).
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = socket.write_all(answer.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        FakeConsul { url, task }
    }
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        self.task.abort();
    }
}

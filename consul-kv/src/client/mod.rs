//! A thin typed client for Consul's KV and Txn HTTP API.
//!
//! Reads return the answer's `X-Consul-Index` (also on 404, so a watch on
//! an empty prefix can block); values are bytes; `?recurse` is sent only
//! when meant (Consul treats it as a presence flag).

mod config;
mod error;
mod watch;

use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};

pub use config::ClientConfig;
pub use error::Error;
pub use watch::{PrefixWatch, WatchOptions, WatchUpdate};

use crate::duration::format_go_duration;
use crate::secret::SecretToken;
use crate::types::{KvPair, TxnOp, TxnOpError, TxnResponseBody, TxnResult};
use error::body_excerpt;

/// Characters kept as they are in a key's URL path: unreserved ones and `/`.
const KEY_PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// Consul caps blocking waits at 10 minutes and adds up to 1/16 jitter.
const MAX_SERVER_WAIT: Duration = Duration::from_secs(600);

/// A read's answer with its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed<T> {
    pub value: T,
    /// `X-Consul-Index`: pass it to a blocking read to wait for a change.
    pub index: u64,
    /// `X-Consul-KnownLeader`.
    pub known_leader: bool,
}

/// Parameters of a blocking read: return once the answer's index exceeds
/// `index`, or after about `wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockingQuery {
    pub index: u64,
    pub wait: Duration,
}

/// Consul KV/Txn client. Cheap to clone (one shared connection pool).
#[derive(Clone)]
pub struct ConsulKv {
    http: reqwest::Client,
    base_url: String,
    token: Option<SecretToken>,
    request_timeout: Duration,
}

impl std::fmt::Debug for ConsulKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulKv")
            .field("base_url", &self.base_url)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// A raw answer.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

/// Names a request in errors.
struct Target {
    method: &'static str,
    path: String,
}

impl Target {
    fn decode(&self, reason: impl Into<String>) -> Error {
        Error::Decode {
            method: self.method,
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// Maps a non-success status to its error.
    fn status_error(&self, answer: &Answer) -> Error {
        let message = body_excerpt(&answer.body);
        match answer.status {
            StatusCode::FORBIDDEN => Error::AclDenied {
                method: self.method,
                path: self.path.clone(),
                message,
            },
            StatusCode::PAYLOAD_TOO_LARGE => Error::TooLarge {
                method: self.method,
                path: self.path.clone(),
                message,
            },
            status => Error::Status {
                method: self.method,
                path: self.path.clone(),
                status: status.as_u16(),
                body: message,
            },
        }
    }
}

fn kv_path(key: &str) -> String {
    format!(
        "/v1/kv/{}",
        percent_encoding::utf8_percent_encode(key, KEY_PATH)
    )
}

impl ConsulKv {
    pub fn new(config: ClientConfig) -> Result<Self, Error> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // Below the bundled server's 30 s idle close, so a request is
            // never sent on a connection the server is closing.
            .pool_idle_timeout(Duration::from_secs(20));
        if config.is_loopback() {
            builder = builder.no_proxy();
        }
        if let Some(path) = &config.ca_cert {
            let pem = std::fs::read(path).map_err(|e| {
                Error::Config(format!("cannot read CONSUL_CACERT {}: {e}", path.display()))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                Error::Config(format!(
                    "CONSUL_CACERT {} is not PEM certificates: {e}",
                    path.display()
                ))
            })?;
            if certs.is_empty() {
                return Err(Error::Config(format!(
                    "CONSUL_CACERT {} holds no certificate",
                    path.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if config.is_https() {
            builder = builder.https_only(true);
        }
        let http = builder
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(ConsulKv {
            http,
            base_url: config.base_url().to_owned(),
            token: config.token,
            request_timeout: config.request_timeout,
        })
    }

    /// A client configured from Consul's environment variables.
    pub fn from_env() -> Result<Self, Error> {
        Self::new(ClientConfig::from_env()?)
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(Target, Answer), Error> {
        let target = Target {
            method: match method {
                Method::GET => "GET",
                Method::PUT => "PUT",
                Method::DELETE => "DELETE",
                _ => "request",
            },
            path: path.to_owned(),
        };
        let mut url = format!("{}{}", self.base_url, path);
        if !query.is_empty() {
            let mut encoded = form_urlencoded::Serializer::new(String::new());
            for (name, value) in query {
                encoded.append_pair(name, value);
            }
            url.push('?');
            url.push_str(&encoded.finish());
        }
        let mut request = self.http.request(method, url).timeout(timeout);
        if let Some(token) = &self.token {
            request = request.header("X-Consul-Token", token.expose());
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        let transport = |source: reqwest::Error| Error::Transport {
            method: target.method,
            path: target.path.clone(),
            source: source.without_url(),
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(transport)?.to_vec();
        Ok((
            target,
            Answer {
                status,
                headers,
                body,
            },
        ))
    }

    /// A KV read: 200 and 404 carry the index; anything else is an error.
    async fn read(
        &self,
        path: &str,
        mut query: Vec<(&str, String)>,
        blocking: Option<BlockingQuery>,
    ) -> Result<(Target, Option<Vec<u8>>, u64, bool), Error> {
        let mut timeout = self.request_timeout;
        if let Some(blocking) = blocking {
            let wait = blocking.wait.min(MAX_SERVER_WAIT);
            query.push(("index", blocking.index.to_string()));
            query.push(("wait", format_go_duration(wait)));
            timeout += wait + wait / 16;
        }
        let (target, answer) = self.send(Method::GET, path, &query, None, timeout).await?;
        let found = match answer.status {
            StatusCode::OK => true,
            StatusCode::NOT_FOUND => false,
            _ => return Err(target.status_error(&answer)),
        };
        let index = answer
            .headers
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| target.decode("missing or invalid X-Consul-Index header"))?;
        let known_leader = answer
            .headers
            .get("X-Consul-KnownLeader")
            .is_some_and(|v| v.as_bytes() == b"true");
        Ok((target, found.then_some(answer.body), index, known_leader))
    }

    async fn read_entries(
        &self,
        key: &str,
        recurse: bool,
        blocking: Option<BlockingQuery>,
    ) -> Result<Indexed<Vec<KvPair>>, Error> {
        let query = if recurse {
            vec![("recurse", String::new())]
        } else {
            Vec::new()
        };
        let (target, body, index, known_leader) = self.read(&kv_path(key), query, blocking).await?;
        let entries = match body {
            None => Vec::new(),
            Some(body) => serde_json::from_slice::<Vec<KvPair>>(&body)
                .map_err(|e| target.decode(e.to_string()))?,
        };
        Ok(Indexed {
            value: entries,
            index,
            known_leader,
        })
    }

    fn single(answer: Indexed<Vec<KvPair>>, key: &str) -> Indexed<Option<KvPair>> {
        Indexed {
            value: answer.value.into_iter().find(|pair| pair.key == key),
            index: answer.index,
            known_leader: answer.known_leader,
        }
    }

    /// One key; `None` when it does not exist (the index is still valid).
    pub async fn get(&self, key: &str) -> Result<Indexed<Option<KvPair>>, Error> {
        Ok(Self::single(
            self.read_entries(key, false, None).await?,
            key,
        ))
    }

    /// [`Self::get`], waiting for the answer's index to pass `query.index`.
    pub async fn get_blocking(
        &self,
        key: &str,
        query: BlockingQuery,
    ) -> Result<Indexed<Option<KvPair>>, Error> {
        Ok(Self::single(
            self.read_entries(key, false, Some(query)).await?,
            key,
        ))
    }

    /// Every entry whose key starts with `prefix` (plain string prefix:
    /// `vol/1` also matches `vol/10`); empty when none.
    pub async fn get_recurse(&self, prefix: &str) -> Result<Indexed<Vec<KvPair>>, Error> {
        self.read_entries(prefix, true, None).await
    }

    /// [`Self::get_recurse`], waiting for the answer's index to pass
    /// `query.index`.
    pub async fn get_recurse_blocking(
        &self,
        prefix: &str,
        query: BlockingQuery,
    ) -> Result<Indexed<Vec<KvPair>>, Error> {
        self.read_entries(prefix, true, Some(query)).await
    }

    async fn read_keys(
        &self,
        prefix: &str,
        separator: Option<&str>,
        blocking: Option<BlockingQuery>,
    ) -> Result<Indexed<Vec<String>>, Error> {
        let mut query = vec![("keys", String::new())];
        if let Some(separator) = separator {
            query.push(("separator", separator.to_owned()));
        }
        let (target, body, index, known_leader) =
            self.read(&kv_path(prefix), query, blocking).await?;
        let keys = match body {
            None => Vec::new(),
            Some(body) => serde_json::from_slice::<Vec<String>>(&body)
                .map_err(|e| target.decode(e.to_string()))?,
        };
        Ok(Indexed {
            value: keys,
            index,
            known_leader,
        })
    }

    /// Key names under `prefix`; with a separator, names are cut after the
    /// first separator following the prefix (folders).
    pub async fn keys(
        &self,
        prefix: &str,
        separator: Option<&str>,
    ) -> Result<Indexed<Vec<String>>, Error> {
        self.read_keys(prefix, separator, None).await
    }

    /// [`Self::keys`], waiting for the answer's index to pass `query.index`.
    pub async fn keys_blocking(
        &self,
        prefix: &str,
        separator: Option<&str>,
        query: BlockingQuery,
    ) -> Result<Indexed<Vec<String>>, Error> {
        self.read_keys(prefix, separator, Some(query)).await
    }

    /// A write answered `true`/`false` (Consul may add a newline).
    async fn write(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<bool, Error> {
        let (target, answer) = self
            .send(method, path, query, body, self.request_timeout)
            .await?;
        if answer.status != StatusCode::OK {
            return Err(target.status_error(&answer));
        }
        match std::str::from_utf8(&answer.body).map(str::trim) {
            Ok("true") => Ok(true),
            Ok("false") => Ok(false),
            _ => Err(target.decode(format!(
                "expected true or false, got {:?}",
                body_excerpt(&answer.body)
            ))),
        }
    }

    /// Writes `value` (flags 0). Consul answers `true` for a plain write.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<bool, Error> {
        self.write(Method::PUT, &kv_path(key), &[], Some(value.to_vec()))
            .await
    }

    /// Writes `value` with opaque `flags`.
    pub async fn put_with_flags(&self, key: &str, value: &[u8], flags: u64) -> Result<bool, Error> {
        self.write(
            Method::PUT,
            &kv_path(key),
            &[("flags", flags.to_string())],
            Some(value.to_vec()),
        )
        .await
    }

    /// Writes only if the key's `ModifyIndex` is `cas_index` (0: only if
    /// the key does not exist). `false` means nothing was written.
    pub async fn put_cas(&self, key: &str, value: &[u8], cas_index: u64) -> Result<bool, Error> {
        self.write(
            Method::PUT,
            &kv_path(key),
            &[("cas", cas_index.to_string())],
            Some(value.to_vec()),
        )
        .await
    }

    /// Deletes one key (a missing key is fine).
    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        self.write(Method::DELETE, &kv_path(key), &[], None)
            .await
            .map(drop)
    }

    /// Deletes only if the key's `ModifyIndex` is `index`; `true` also when
    /// the key does not exist.
    pub async fn delete_cas(&self, key: &str, index: u64) -> Result<bool, Error> {
        self.write(
            Method::DELETE,
            &kv_path(key),
            &[("cas", index.to_string())],
            None,
        )
        .await
    }

    /// Deletes every key starting with `prefix`.
    pub async fn delete_tree(&self, prefix: &str) -> Result<(), Error> {
        self.write(
            Method::DELETE,
            &kv_path(prefix),
            &[("recurse", String::new())],
            None,
        )
        .await
        .map(drop)
    }

    /// Runs `ops` atomically. On 409 returns [`Error::TxnConflict`] listing
    /// every failing operation; nothing was written then.
    pub async fn txn(&self, ops: &[TxnOp]) -> Result<Vec<TxnResult>, Error> {
        let body = serde_json::to_vec(&ops.iter().map(TxnOp::to_wire).collect::<Vec<_>>())
            .expect("txn operations serialize");
        let (target, answer) = self
            .send(
                Method::PUT,
                "/v1/txn",
                &[],
                Some(body),
                self.request_timeout,
            )
            .await?;
        match answer.status {
            StatusCode::OK => {
                let parsed: TxnResponseBody = serde_json::from_slice(&answer.body)
                    .map_err(|e| target.decode(e.to_string()))?;
                Ok(parsed.results.unwrap_or_default())
            }
            StatusCode::CONFLICT => {
                let parsed: TxnResponseBody = serde_json::from_slice(&answer.body)
                    .map_err(|e| target.decode(e.to_string()))?;
                let failures: Vec<TxnOpError> = parsed.errors.unwrap_or_default();
                if failures.is_empty() {
                    return Err(target.decode("409 without errors"));
                }
                Err(Error::TxnConflict { failures })
            }
            _ => Err(target.status_error(&answer)),
        }
    }

    /// A watch over every key under `prefix`; see [`PrefixWatch`].
    pub fn watch_prefix(&self, prefix: impl Into<String>, options: WatchOptions) -> PrefixWatch {
        PrefixWatch::new(self.clone(), prefix.into(), options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_are_escaped() {
        assert_eq!(kv_path("vol/1"), "/v1/kv/vol/1");
        assert_eq!(kv_path("a b?c&d#e%"), "/v1/kv/a%20b%3Fc%26d%23e%25");
        assert_eq!(kv_path("é"), "/v1/kv/%C3%A9");
    }

    #[test]
    fn debug_hides_token() {
        let config = ClientConfig::new("127.0.0.1:1")
            .unwrap()
            .with_token(SecretToken::new("hidden-token-value"));
        let client = ConsulKv::new(config).unwrap();
        assert!(!format!("{client:?}").contains("hidden-token-value"));
    }
}

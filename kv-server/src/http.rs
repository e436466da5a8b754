//! HTTP surface: Consul's `/v1/kv` and `/v1/txn` (`agent/kvs_endpoint.go`,
//! `agent/txn_endpoint.go`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::Rng as _;
use serde::Serialize;
use serde_json::Value as Json;
use tokio::sync::watch;

use crate::acl::{Rules, TokenRules};
use crate::state::{KvState, ReceivedOp};
use crate::store::{Outcome, Store};
use crate::{DEFAULT_QUERY_WAIT, MAX_KEY_BYTES, MAX_QUERY_WAIT};
use consul_kv::duration::parse_go_duration;
use consul_kv::types::{TxnOp, TxnResponseBody};

/// Consul's `TxnMaxReqLen` default: the whole txn body.
const MAX_TXN_BODY_BYTES: usize = 512 * 1024;
/// An oversized body is read and discarded up to this much, so that a
/// client that sends the whole body before reading (most do) gets its 413
/// instead of a reset connection; past it the connection is closed.
const MAX_DRAIN_BYTES: u64 = 16 * 1024 * 1024;

pub(crate) struct App {
    pub store: Store,
    pub acl: Vec<TokenRules>,
    pub max_value_bytes: usize,
    pub max_txn_ops: usize,
    pub local_addr: SocketAddr,
    pub datacenter: String,
    pub body_read_timeout: Duration,
    pub shutdown: watch::Receiver<bool>,
}

pub(crate) fn router(app: Arc<App>) -> Router {
    Router::new().fallback(handle).with_state(app)
}

/// Query parameters; Consul's flags (`recurse`, `keys`, `raw`, `cas`, ...)
/// count by presence, whatever their value.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: Option<&str>) -> Self {
        Params(
            form_urlencoded::parse(query.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(body.into()))
        .expect("static response parts are valid")
}

/// A request refused before or instead of reaching the store: a status and
/// a plain-text reason (what Consul sends for such errors).
struct Refusal {
    status: StatusCode,
    message: String,
    /// The rest of the request was not read: the connection must close.
    close: bool,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
            close: false,
        }
    }

    fn into_response(self) -> Response {
        let mut response = text(self.status, self.message);
        if self.close {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

fn json_body(value: &impl Serialize, pretty: bool) -> Vec<u8> {
    if pretty {
        let mut out = serde_json::to_vec_pretty(value).expect("serializable");
        out.push(b'\n');
        out
    } else {
        serde_json::to_vec(value).expect("serializable")
    }
}

fn json(status: StatusCode, value: &impl Serialize, pretty: bool) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json_body(value, pretty)))
        .expect("static response parts are valid")
}

/// What a request's token may do.
#[derive(Clone, Copy)]
enum Access<'a> {
    /// The server runs without ACLs.
    Open,
    Rules(&'a Rules),
}

impl Access<'_> {
    fn can_read(self, key: &str) -> bool {
        match self {
            Access::Open => true,
            Access::Rules(rules) => rules.can_read(key),
        }
    }

    fn can_write(self, key: &str) -> bool {
        match self {
            Access::Open => true,
            Access::Rules(rules) => rules.can_write(key),
        }
    }

    fn can_write_prefix(self, prefix: &str) -> bool {
        match self {
            Access::Open => true,
            Access::Rules(rules) => rules.can_write_prefix(prefix),
        }
    }

    /// What one txn operation needs, as Consul's `kvsPreApply` decides:
    /// reads need read, `get-tree` is filtered on output, the rest need
    /// write (`delete-tree` on the whole prefix).
    fn allows(self, op: &TxnOp) -> bool {
        match op {
            TxnOp::Get { key } | TxnOp::GetOrEmpty { key } | TxnOp::CheckIndex { key, .. } => {
                self.can_read(key)
            }
            TxnOp::GetTree { .. } => true,
            TxnOp::DeleteTree { prefix } => self.can_write_prefix(prefix),
            TxnOp::Set { key, .. }
            | TxnOp::Cas { key, .. }
            | TxnOp::Delete { key }
            | TxnOp::DeleteCas { key, .. }
            | TxnOp::CheckNotExists { key } => self.can_write(key),
        }
    }
}

fn permission_denied() -> Refusal {
    Refusal::new(StatusCode::FORBIDDEN, "Permission denied")
}

/// Headers of every read answer, 404 included.
fn add_query_meta(response: &mut Response, index: Option<u64>) {
    let headers = response.headers_mut();
    if let Some(index) = index {
        headers.insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    }
    headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
}

async fn handle(State(app): State<Arc<App>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    // Only the path is logged: the query may carry `?token=`.
    tracing::debug!(%method, %path, "request");
    let params = Params::parse(request.uri().query());
    // Consul forwards to another datacenter before anything else; this
    // server has no other, and must not answer from its own store.
    if params
        .get("dc")
        .is_some_and(|dc| !dc.is_empty() && dc != app.datacenter)
    {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
    }

    let key_path = if path == "/v1/kv" {
        Some("")
    } else {
        path.strip_prefix("/v1/kv/")
    };
    if let Some(encoded_key) = key_path {
        let access = match app.authorize(request.headers(), &params) {
            Ok(access) => access,
            Err(denied) => return denied.into_response(),
        };
        let key = match percent_encoding::percent_decode_str(encoded_key).decode_utf8() {
            Ok(key) => key.into_owned(),
            Err(_) => return text(StatusCode::BAD_REQUEST, "Key is not valid UTF-8"),
        };
        if let Err(refused) = check_key_length(&key) {
            return refused.into_response();
        }
        return match method {
            Method::GET => kv_get(&app, access, key, &params).await,
            Method::PUT => kv_put(&app, access, key, &params, request).await,
            Method::DELETE => kv_delete(&app, access, key, &params).await,
            _ => method_not_allowed("GET, PUT, DELETE"),
        };
    }
    match path.as_str() {
        "/v1/txn" => {
            let access = match app.authorize(request.headers(), &params) {
                Ok(access) => access,
                Err(denied) => return denied.into_response(),
            };
            if method != Method::PUT {
                return method_not_allowed("PUT");
            }
            txn(&app, access, &params, request).await
        }
        "/v1/status/leader" if method == Method::GET => json(
            StatusCode::OK,
            &app.local_addr.to_string(),
            params.has("pretty"),
        ),
        "/v1/status/peers" if method == Method::GET => json(
            StatusCode::OK,
            &[app.local_addr.to_string()],
            params.has("pretty"),
        ),
        // Open like the status endpoints: clients call it at start-up,
        // some without their token, and it shows only names.
        "/v1/agent/self" if method == Method::GET => {
            json(StatusCode::OK, &app.agent_self(), params.has("pretty"))
        }
        _ if path.starts_with("/v1/session/") => text(
            StatusCode::NOT_IMPLEMENTED,
            "Sessions are not supported by this server: /v1/session is unavailable, \
             so no lock or semaphore can be held through it",
        ),
        _ => text(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

/// Keys (and prefixes) are bounded, so a client cannot grow the state with
/// one huge name.
fn check_key_length(key: &str) -> Result<(), Refusal> {
    if key.len() > MAX_KEY_BYTES {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("Key too long ({} bytes > {MAX_KEY_BYTES} bytes)", key.len()),
        ));
    }
    Ok(())
}

fn method_not_allowed(allowed: &'static str) -> Response {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    response
}

impl App {
    /// The fields of Consul's `/v1/agent/self` that clients read at start-up.
    fn agent_self(&self) -> Json {
        serde_json::json!({
            "Config": {
                "Datacenter": self.datacenter,
                "NodeName": "volkv",
                "Server": true,
                "Version": concat!("volkv-", env!("CARGO_PKG_VERSION")),
            },
            "Member": {
                "Name": "volkv",
                "Addr": self.local_addr.ip().to_string(),
                "Port": self.local_addr.port(),
                "Status": 1,
                "Tags": { "dc": self.datacenter, "role": "consul" },
            },
        })
    }

    /// Consul's token sources, in order: `?token`, `X-Consul-Token`,
    /// `Authorization: Bearer`. No token is the anonymous token, which may
    /// do nothing here. Without ACLs everything is allowed.
    fn authorize(&self, headers: &HeaderMap, params: &Params) -> Result<Access<'_>, Refusal> {
        if self.acl.is_empty() {
            return Ok(Access::Open);
        }
        let presented = params
            .get("token")
            .filter(|t| !t.is_empty())
            .or_else(|| {
                headers
                    .get("X-Consul-Token")
                    .and_then(|v| v.to_str().ok())
                    .filter(|t| !t.is_empty())
            })
            .or_else(|| {
                headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
            });
        let Some(presented) = presented else {
            return Err(permission_denied());
        };
        // Every token is compared, so the time taken does not tell which
        // one matched.
        let mut found = None;
        for token in &self.acl {
            if token.secret.matches(presented) && found.is_none() {
                found = Some(token);
            }
        }
        match found {
            Some(token) => Ok(Access::Rules(&token.rules)),
            None => Err(Refusal::new(StatusCode::FORBIDDEN, "ACL not found")),
        }
    }

    /// Runs `query` now, and, for a blocking read (`index` > 0), again after
    /// each commit until its index passes `index`, the wait ends, or the
    /// server stops.
    async fn blocking_read<T>(
        &self,
        min_index: u64,
        wait: Duration,
        query: impl Fn(&KvState) -> (T, u64),
    ) -> (T, u64) {
        let mut commits = self.store.subscribe();
        commits.borrow_and_update();
        let answer = self.store.read(&query);
        if min_index == 0 || answer.1 > min_index {
            return answer;
        }
        let deadline = tokio::time::Instant::now() + with_jitter(wait);
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                changed = commits.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break,
                _ = shutdown.wait_for(|stopping| *stopping) => break,
            }
            commits.borrow_and_update();
            let answer = self.store.read(&query);
            if answer.1 > min_index {
                return answer;
            }
        }
        self.store.read(&query)
    }

    async fn commit(self: &Arc<Self>, ops: Vec<ReceivedOp>) -> Result<Outcome, Refusal> {
        let app = Arc::clone(self);
        match tokio::task::spawn_blocking(move || app.store.commit(&ops)).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(error)) => {
                tracing::error!(%error, "write refused");
                Err(Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    error.to_string(),
                ))
            }
            Err(join) => Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("write task failed: {join}"),
            )),
        }
    }
}

/// Consul's `RPCQueryTimeout`: default when unset, capped, plus up to
/// 1/16 of random jitter so that many watchers do not return together.
fn with_jitter(wait: Duration) -> Duration {
    let wait = if wait.is_zero() {
        DEFAULT_QUERY_WAIT
    } else {
        wait.min(MAX_QUERY_WAIT)
    };
    let max_jitter = u64::try_from((wait / 16).as_millis()).unwrap_or(u64::MAX);
    wait + Duration::from_millis(rand::rng().random_range(0..=max_jitter))
}

/// `?index` and `?wait`.
fn blocking_params(params: &Params) -> Result<(u64, Duration), Refusal> {
    let index = match params.get("index") {
        None | Some("") => 0,
        Some(text_index) => text_index
            .parse::<u64>()
            .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "Invalid index"))?,
    };
    let wait = match params.get("wait") {
        None | Some("") => Duration::ZERO,
        Some(wait) => {
            let parsed = parse_go_duration(wait)
                .map_err(|_| Refusal::new(StatusCode::BAD_REQUEST, "Invalid wait time"))?;
            if parsed.negative {
                Duration::ZERO
            } else {
                parsed.magnitude
            }
        }
    };
    Ok((index, wait))
}

async fn kv_get(app: &Arc<App>, access: Access<'_>, key: String, params: &Params) -> Response {
    let (min_index, wait) = match blocking_params(params) {
        Ok(found) => found,
        Err(bad) => return bad.into_response(),
    };
    let pretty = params.has("pretty");
    if params.has("keys") {
        // Consul still reads its historic misspelling too.
        let separator = params
            .get("separator")
            .or_else(|| params.get("seperator"))
            .unwrap_or("")
            .to_owned();
        let (mut keys, index) = app
            .blocking_read(min_index, wait, |state| state.keys(&key, &separator))
            .await;
        // As Consul: what the token may not read is left out, not refused.
        keys.retain(|name| access.can_read(name));
        // The root lists as `[]`; an empty prefix below it is a 404.
        let mut response = if keys.is_empty() && !key.is_empty() {
            Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Body::empty())
                .expect("valid")
        } else {
            json(StatusCode::OK, &keys, pretty)
        };
        add_query_meta(&mut response, Some(index));
        return response;
    }
    let recurse = params.has("recurse");
    if !recurse && key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    if !recurse && !access.can_read(&key) {
        return permission_denied().into_response();
    }
    let (mut entries, index) = if recurse {
        app.blocking_read(min_index, wait, |state| state.list(&key))
            .await
    } else {
        app.blocking_read(min_index, wait, |state| {
            let (entry, index) = state.get(&key);
            (entry.into_iter().collect::<Vec<_>>(), index)
        })
        .await
    };
    entries.retain(|entry| access.can_read(&entry.key));
    let mut response = if entries.is_empty() {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::empty())
            .expect("valid")
    } else if params.has("raw") && !recurse {
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain")
            .header("X-Content-Type-Options", "nosniff")
            .header("Content-Security-Policy", "sandbox")
            .body(Body::from(entries[0].value.clone()))
            .expect("valid")
    } else {
        json(StatusCode::OK, &entries, pretty)
    };
    add_query_meta(&mut response, Some(index));
    response
}

fn parse_u64_param(params: &Params, name: &str) -> Result<Option<u64>, Refusal> {
    match params.get(name) {
        None => Ok(None),
        Some(value) => value.parse::<u64>().map(Some).map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("Invalid {name} value: {value:?}"),
            )
        }),
    }
}

/// Consul refuses requests naming more than one of these flags. Only the
/// flag names are echoed: the query may hold a token.
fn conflicting_flags(params: &Params, flags: &[&str]) -> Option<Response> {
    let present: Vec<&str> = flags.iter().copied().filter(|f| params.has(f)).collect();
    (present.len() > 1).then(|| {
        text(
            StatusCode::BAD_REQUEST,
            format!("Conflicting flags: {}\n", present.join(", ")),
        )
    })
}

fn too_large(limit: usize) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("Request body too large, max size: {limit} bytes"),
    )
}

/// The body, refused with 413 past `limit` and with 408 when it is not
/// received within the body timeout. An oversized body is still read (and
/// dropped) up to [`MAX_DRAIN_BYTES`], so the client can read the 413.
async fn read_body(request: Request, limit: usize, timeout: Duration) -> Result<Bytes, Refusal> {
    use http_body_util::BodyExt as _;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_DRAIN_BYTES) {
        let mut refusal = too_large(limit);
        refusal.close = true;
        return Err(refusal);
    }
    let mut body = request.into_body();
    let read = async {
        let mut kept: Vec<u8> = Vec::new();
        let mut seen: u64 = 0;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "Failed to read the request body",
                ));
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            seen += data.len() as u64;
            if seen > MAX_DRAIN_BYTES {
                let mut refusal = too_large(limit);
                refusal.close = true;
                return Err(refusal);
            }
            if seen <= limit as u64 {
                kept.extend_from_slice(&data);
            }
        }
        if seen > limit as u64 {
            return Err(too_large(limit));
        }
        Ok(Bytes::from(kept))
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => {
            let mut refusal = Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("Request body not received within {timeout:?}"),
            );
            refusal.close = true;
            Err(refusal)
        }
    }
}

async fn kv_put(
    app: &Arc<App>,
    access: Access<'_>,
    key: String,
    params: &Params,
    request: Request,
) -> Response {
    if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    if !access.can_write(&key) {
        return permission_denied().into_response();
    }
    if let Some(conflict) = conflicting_flags(params, &["cas", "acquire", "release"]) {
        return conflict;
    }
    if params.has("acquire") || params.has("release") {
        return text(
            StatusCode::NOT_IMPLEMENTED,
            "Sessions are not supported by this server: ?acquire and ?release are unavailable",
        );
    }
    let flags = match parse_u64_param(params, "flags") {
        Ok(flags) => flags.unwrap_or(0),
        Err(bad) => return bad.into_response(),
    };
    let cas = match parse_u64_param(params, "cas") {
        Ok(cas) => cas,
        Err(bad) => return bad.into_response(),
    };
    let value = match read_body(request, app.max_value_bytes, app.body_read_timeout).await {
        Ok(body) => body.to_vec(),
        Err(too_large) => return too_large.into_response(),
    };
    let op = match cas {
        Some(index) => TxnOp::Cas {
            key,
            value,
            flags,
            index,
        },
        None => TxnOp::Set { key, value, flags },
    };
    match app.commit(vec![Ok(op)]).await {
        Ok(Outcome::Committed(_)) => json(StatusCode::OK, &true, params.has("pretty")),
        Ok(Outcome::Refused(_)) => json(StatusCode::OK, &false, params.has("pretty")),
        Err(failed) => failed.into_response(),
    }
}

async fn kv_delete(app: &Arc<App>, access: Access<'_>, key: String, params: &Params) -> Response {
    if let Some(conflict) = conflicting_flags(params, &["recurse", "cas"]) {
        return conflict;
    }
    let allowed = if params.has("recurse") {
        access.can_write_prefix(&key)
    } else {
        access.can_write(&key)
    };
    if !allowed {
        return permission_denied().into_response();
    }
    let op = if params.has("recurse") {
        TxnOp::DeleteTree { prefix: key }
    } else if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    } else {
        match parse_u64_param(params, "cas") {
            Ok(Some(index)) => TxnOp::DeleteCas { key, index },
            Ok(None) => TxnOp::Delete { key },
            Err(bad) => return bad.into_response(),
        }
    };
    match app.commit(vec![Ok(op)]).await {
        Ok(Outcome::Committed(_)) => json(StatusCode::OK, &true, params.has("pretty")),
        Ok(Outcome::Refused(_)) => json(StatusCode::OK, &false, params.has("pretty")),
        Err(failed) => failed.into_response(),
    }
}

/// Go's JSON decoding matches field names without regard to case.
fn field<'a>(object: &'a serde_json::Map<String, Json>, name: &str) -> Option<&'a Json> {
    object
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn bad_body(reason: impl std::fmt::Display) -> Refusal {
    Refusal::new(
        StatusCode::BAD_REQUEST,
        format!("Failed to parse body: {reason}"),
    )
}

fn string_field(kv: &serde_json::Map<String, Json>, name: &str) -> Result<String, Refusal> {
    match field(kv, name) {
        None | Some(Json::Null) => Ok(String::new()),
        Some(Json::String(s)) => Ok(s.clone()),
        Some(other) => Err(bad_body(format!("{name}: expected a string, got {other}"))),
    }
}

fn u64_field(kv: &serde_json::Map<String, Json>, name: &str) -> Result<u64, Refusal> {
    match field(kv, name) {
        None | Some(Json::Null) => Ok(0),
        Some(value) => value
            .as_u64()
            .ok_or_else(|| bad_body(format!("{name}: expected an unsigned integer, got {value}"))),
    }
}

/// One element of the txn array. Body-level problems (types, base64,
/// sizes) reject the request; an operation this server cannot run becomes
/// that operation's error in the 409 answer.
fn parse_op(raw: &Json, max_value_bytes: usize) -> Result<ReceivedOp, Refusal> {
    let Json::Object(op) = raw else {
        return Err(bad_body("each operation must be an object"));
    };
    let kv = match field(op, "KV") {
        Some(Json::Object(kv)) => kv,
        Some(Json::Null) | None => {
            let other_kind = ["Node", "Service", "Check", "Session", "Intention"]
                .iter()
                .any(|kind| field(op, kind).is_some_and(|v| !v.is_null()));
            return Ok(Err(if other_kind {
                "this server supports only KV operations".to_owned()
            } else {
                "no operation specified".to_owned()
            }));
        }
        Some(_) => return Err(bad_body("KV must be an object")),
    };
    let verb = string_field(kv, "Verb")?;
    let key = string_field(kv, "Key")?;
    check_key_length(&key)?;
    let value = match field(kv, "Value") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::String(encoded)) => BASE64
            .decode(encoded.as_bytes())
            .map_err(|e| bad_body(format!("failed to decode value: {e}")))?,
        Some(other) => return Err(bad_body(format!("unexpected value type: {other}"))),
    };
    if value.len() > max_value_bytes {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Value for key {key:?} is too large ({} > {max_value_bytes} bytes)",
                value.len()
            ),
        ));
    }
    let flags = u64_field(kv, "Flags")?;
    let index = u64_field(kv, "Index")?;
    let op = match verb.as_str() {
        "set" => TxnOp::Set { key, value, flags },
        "cas" => TxnOp::Cas {
            key,
            value,
            flags,
            index,
        },
        "get" => TxnOp::Get { key },
        "get-or-empty" => TxnOp::GetOrEmpty { key },
        "get-tree" => TxnOp::GetTree { prefix: key },
        "check-index" => TxnOp::CheckIndex { key, index },
        "check-not-exists" => TxnOp::CheckNotExists { key },
        "delete" => TxnOp::Delete { key },
        "delete-tree" => TxnOp::DeleteTree { prefix: key },
        "delete-cas" => TxnOp::DeleteCas { key, index },
        "lock" | "unlock" | "check-session" => {
            return Ok(Err(format!(
                "KV verb {verb:?} needs sessions, which this server does not support"
            )))
        }
        _ => return Ok(Err(format!("unknown KV verb {verb:?}"))),
    };
    Ok(Ok(op))
}

fn is_write(op: &ReceivedOp) -> bool {
    matches!(
        op,
        Ok(TxnOp::Set { .. }
            | TxnOp::Cas { .. }
            | TxnOp::Delete { .. }
            | TxnOp::DeleteTree { .. }
            | TxnOp::DeleteCas { .. })
    )
}

async fn txn(app: &Arc<App>, access: Access<'_>, params: &Params, request: Request) -> Response {
    let limit = MAX_TXN_BODY_BYTES.max(app.max_value_bytes);
    let body = match read_body(request, limit, app.body_read_timeout).await {
        Ok(body) => body,
        Err(too_large) => return too_large.into_response(),
    };
    let raw_ops: Vec<Json> = match serde_json::from_slice(&body) {
        Ok(ops) => ops,
        Err(e) => return bad_body(e).into_response(),
    };
    if raw_ops.len() > app.max_txn_ops {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Transaction contains too many operations ({} > {})",
                raw_ops.len(),
                app.max_txn_ops
            ),
        );
    }
    let mut ops = Vec::with_capacity(raw_ops.len());
    for raw in &raw_ops {
        match parse_op(raw, app.max_value_bytes) {
            // A denied operation fails on its own, in the 409, as in Consul.
            Ok(Ok(op)) if !access.allows(&op) => ops.push(Err("Permission denied".to_owned())),
            Ok(op) => ops.push(op),
            Err(refused) => return refused.into_response(),
        }
    }
    let read_only = !ops.iter().any(is_write);
    let pretty = params.has("pretty");
    let mut response = match app.commit(ops).await {
        Ok(Outcome::Committed(mut results)) => json(
            StatusCode::OK,
            &TxnResponseBody {
                results: Some({
                    // `get-tree` shows only what the token may read; every
                    // other result's key was checked above.
                    results.retain(|result| access.can_read(&result.kv.key));
                    results
                }),
                errors: None,
            },
            pretty,
        ),
        Ok(Outcome::Refused(errors)) => json(
            StatusCode::CONFLICT,
            &TxnResponseBody {
                results: None,
                errors: Some(errors),
            },
            pretty,
        ),
        Err(failed) => return failed.into_response(),
    };
    if read_only {
        // Consul serves read-only transactions like reads (no index).
        add_query_meta(&mut response, None);
    }
    response
}

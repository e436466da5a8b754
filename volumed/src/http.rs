//! `/metrics` (Prometheus text format) and `/healthz`.

use crate::metrics::Metrics;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    /// The reconcile loop is considered stuck when it has not turned for this long.
    stall_after: Duration,
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
}

/// 200 while the reconcile loop turns and the pool can take writes; the KV
/// state is shown, not judged: the host keeps serving its volumes while the
/// KV store is away. A pool that cannot take writes answers 503 with
/// `degraded: <reason>` as the first line, so a load balancer or a probe
/// that only reads the status sees it too.
async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let idle = state.metrics.loop_idle_for();
    let pool = state.metrics.pool_health();
    let kv = if state.metrics.kv_up() {
        "reachable"
    } else {
        "unreachable"
    };
    if idle > state.stall_after {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: reconcile loop idle for {}s\npool: {pool}\nkv: {kv}\n",
                idle.as_secs()
            ),
        )
    } else if !pool.takes_writes() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("degraded: {}\npool: {pool}\nkv: {kv}\n", pool.reason()),
        )
    } else {
        (StatusCode::OK, format!("ok\npool: {pool}\nkv: {kv}\n"))
    }
}

/// Binds and serves until `shutdown` resolves; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    stall_after: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(listen).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .with_state(AppState {
            metrics,
            stall_after,
        });
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(%error, "metrics endpoint failed");
        }
    });
    Ok((bound, task))
}

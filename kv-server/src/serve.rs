//! The accept loop: a cap on open connections (below the file limit), a
//! header read timeout per connection, and a shutdown deadline after which
//! connections still open are closed.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Files the process keeps for itself beyond its connections (data files,
/// the lock, the runtime, blocking tasks).
const RESERVED_FILES: u64 = 32;

pub(crate) struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub shutdown_deadline: Duration,
}

/// The connection cap actually used: the configured one, lowered so that
/// accepting can never run out of file descriptors (an `accept` failing
/// with EMFILE would stall every client, not just the newest).
pub(crate) fn effective_connection_cap(configured: usize) -> usize {
    let soft_limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(u64::MAX);
    let by_files = soft_limit.saturating_sub(RESERVED_FILES).max(1);
    configured
        .min(usize::try_from(by_files).unwrap_or(usize::MAX))
        .max(1)
}

/// Resolves once the server is stopping (or its handle is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await.
    let _ = stop.wait_for(|stopping| *stopping).await.map(|_| ());
}

pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    loop {
        // Past the cap, new connections wait in the listen backlog until a
        // slot frees; the header timeout guarantees slots do free.
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => {
                permit.expect("the semaphore is never closed")
            }
            () = stopped(&mut stop) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(serve_connection(
            stream,
            router.clone(),
            permit,
            limits.header_read_timeout,
            stop.clone(),
        ));
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            deadline = ?limits.shutdown_deadline,
            "closing connections still open at the shutdown deadline"
        );
        connections.shutdown().await;
    }
    Ok(())
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    _permit: OwnedSemaphorePermit,
    header_read_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let connection =
        builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    tokio::pin!(connection);
    tokio::select! {
        served = connection.as_mut() => {
            if let Err(error) = served {
                tracing::debug!(%error, "connection ended with an error");
            }
            return;
        }
        () = stopped(&mut stop) => {}
    }
    // Finish the request in flight, then close; the deadline above bounds
    // how long that may take.
    connection.as_mut().graceful_shutdown();
    if let Err(error) = connection.await {
        tracing::debug!(%error, "connection ended with an error");
    }
}

//! Serving on a socket: the accept loop with graceful shutdown, and [`RunningServer`], a server
//! on its own thread and runtime for tests and the benchmark.

use super::routes::router;
use super::state::AppState;
use super::ServerConfig;
use crate::reranker::Reranker;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

/// Serves `state` on `listener` until `shutdown` completes; then stops accepting connections,
/// gives in-flight requests `shutdown_grace` to finish, answers the rest with 503 `cancelled`,
/// and stops the engine. Connections still open a second after the grace (a client that never
/// finishes sending its request, say) are dropped: the shutdown is bounded whatever clients do.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let st = state.clone();
    let began = Arc::new(tokio::sync::Notify::new());
    let began_tx = began.clone();
    let signal = async move {
        shutdown.await;
        st.begin_draining();
        began_tx.notify_one();
        tracing::info!(
            grace_seconds = st.cfg.shutdown_grace.as_secs_f64(),
            "shutting down: finishing in-flight requests"
        );
        let grace = st.cfg.shutdown_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            tracing::warn!("shutdown grace over: cancelling in-flight requests");
            st.cancel_all();
        });
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(signal);
    let grace = state.cfg.shutdown_grace;
    let deadline = async move {
        began.notified().await;
        tokio::time::sleep(grace + std::time::Duration::from_secs(1)).await;
    };
    tokio::select! {
        served = server => served?,
        _ = deadline => {
            tracing::warn!("connections still open after the shutdown grace: dropping them");
        }
    }
    let st = state.clone();
    let _ = tokio::task::spawn_blocking(move || st.stop_engine()).await;
    tracing::info!("server stopped");
    Ok(())
}

/// A server running on its own thread and runtime (tests, benchmarks).
pub struct RunningServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl RunningServer {
    /// Binds `addr` (port 0: an ephemeral port) and serves in the background.
    pub fn start(
        reranker: Arc<Reranker>,
        cfg: ServerConfig,
        addr: &str,
        worker_threads: usize,
    ) -> crate::Result<RunningServer> {
        let state = AppState::new(reranker, cfg)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .enable_all()
            .build()?;
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let local = std_listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("grating-server".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(std_listener)?;
                    serve(listener, st, async move {
                        let _ = stop_rx.await;
                    })
                    .await
                })
            })?;
        Ok(RunningServer {
            addr: local,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Graceful shutdown, as on SIGTERM; waits for the server to stop.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> std::io::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("server thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

//! Running one rerank request: admission (429 when every permit is taken), the request's
//! checks, tokenization on the blocking pool, the engine, and the wait for its answer until
//! the request's deadline.

use super::calibration::Sample;
use super::error::ApiError;
use super::request::Prepared;
use super::state::{wait_until, AppState, Encoded};
use crate::engine::RerankOutput;
use crate::error::GratingError;
use axum::http::StatusCode;
use std::sync::Arc;
use std::time::Instant;

/// The engine's answer to `p` and the documents (for handlers that echo them).
pub(super) async fn run_rerank(
    st: &Arc<AppState>,
    p: Prepared,
) -> Result<(RerankOutput, Vec<String>), ApiError> {
    let arrived = Instant::now();
    let deadline = arrived + st.cfg.request_timeout;
    let _permit = st.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "overloaded",
            format!(
                "the server is handling its maximum of {} requests; retry later",
                st.cfg.max_concurrent_requests
            ),
        )
        .retry_after(1)
    })?;
    let k = p.check(&st.cfg)?;
    let exact = p.exact;
    let st2 = st.clone();
    let tokenize_start = Instant::now();
    let encoded = tokio::task::spawn_blocking(move || st2.encode(p))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("tokenizer task failed: {e}"),
            )
        })?;
    let Encoded {
        pairs,
        documents,
        query,
        opts,
    } = encoded?;
    let tokenize_seconds = tokenize_start.elapsed().as_secs_f64();
    // Only answers that pruning could have changed are worth checking.
    let sampled = st
        .calibrator
        .as_ref()
        .filter(|c| !exact && k < documents.len() && c.should_sample());

    let submitted = Instant::now();
    let answer = wait_until(
        st.submit(pairs, k, exact, deadline, tokenize_seconds),
        deadline,
    )
    .await;
    st.metrics
        .record_engine_time(submitted.elapsed().as_secs_f64());
    match answer {
        Some(Ok(out)) => {
            if let Some(c) = sampled {
                c.offer(Sample {
                    query,
                    documents: documents.clone(),
                    opts,
                    answered: out.ranked.iter().map(|s| s.index).collect(),
                });
            }
            Ok((out, documents))
        }
        // The engine drops a request at its deadline; that is a timeout, not a shutdown.
        Some(Err(GratingError::Cancelled(m))) if Instant::now() >= deadline => {
            Err(timeout(format!(
                "the request did not finish within {:?} ({m})",
                st.cfg.request_timeout
            )))
        }
        Some(Err(e)) => Err(e.into()),
        None => Err(timeout(format!(
            "the request did not finish within {:?}",
            st.cfg.request_timeout
        ))),
    }
}

fn timeout(msg: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", msg)
}

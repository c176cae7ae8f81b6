//! `grating serve`: a rerank HTTP server speaking the Cohere/Jina and TEI request shapes, with
//! concurrent requests sharing layer steps in one monolithic pass (a [`crate::SharedReranker`]).
//!
//! Path of a rerank request: the observe middleware gives it a request id, a tracing span and
//! metrics; auth (when a key is set) checks the bearer token in constant time; the handler takes
//! a concurrency permit (none left: 429), reads the body under the size limit (413), parses it
//! itself (malformed JSON 400, wrong shape 422), checks the limits, tokenizes on the blocking
//! pool and submits the pairs to the scheduler, then waits for the answer until the request's
//! deadline (503 `timeout`, and the engine drops the request at its next step).
//!
//! Where each part lives, so that no file mixes policy, execution, I/O and HTTP plumbing:
//! - `config`: what the server can be told ([`ServerConfig`]);
//! - `state`: [`AppState`], the only place that touches the engine;
//! - `request`: the rules for a rerank request (refusals, K, sequence length);
//! - `execute`: running one rerank request (admission, tokenization, engine, deadline);
//! - `handlers`: the endpoints, translating request shapes to and from the engine's terms;
//! - `middleware`, `routes`: request ids, logs, metrics, auth, the routing table;
//! - `openapi`, `docs`: the API description and its HTML page;
//! - `run`: serving on a socket and shutting down.

pub mod api;
pub mod calibration;
pub mod client;
mod config;
mod docs;
pub mod error;
mod execute;
mod handlers;
mod lenient;
pub mod metrics;
mod middleware;
mod openapi;
mod request;
mod routes;
mod run;
mod state;

pub use config::ServerConfig;
pub use middleware::{constant_time_eq, RequestId};
pub use openapi::ApiDoc;
pub use routes::router;
pub use run::{serve, RunningServer};
pub use state::AppState;

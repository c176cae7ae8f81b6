//! The rerank server on a loopback port: every endpoint, every error path, concurrency that
//! must not change answers, overload, timeouts, auth and graceful shutdown. Uses the shared
//! MiniLM cross-encoder and TREC DL19 passages.

mod common;

use common::{assert_error, Req};
use grating::server::client::{get, post_json, request};
use grating::server::{RunningServer, ServerConfig};
use grating::{sigmoid, Mode, Reranker};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const MODEL: &str = "minilm-l6-msmarco-distilled";

fn reranker() -> Option<Arc<Reranker>> {
    static R: OnceLock<Option<Arc<Reranker>>> = OnceLock::new();
    R.get_or_init(|| {
        let dir = common::shared_model(MODEL)?;
        Some(Arc::new(
            Reranker::load(dir.to_str().unwrap(), &common::isolated_options()).expect("load model"),
        ))
    })
    .clone()
}

/// The first `n` passages of the DL19 subset corpus (real text of about 80 tokens each).
fn passages(n: usize) -> Vec<String> {
    static P: OnceLock<Vec<String>> = OnceLock::new();
    let all = P.get_or_init(|| {
        let dir = common::shared_dir().expect("shared dir");
        let text = std::fs::read_to_string(dir.join("data/trec-dl19-subset/corpus.jsonl")).unwrap();
        text.lines()
            .take(2000)
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["text"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    });
    all.iter().cycle().take(n).cloned().collect()
}

fn start(cfg: ServerConfig) -> Option<RunningServer> {
    let r = reranker()?;
    Some(RunningServer::start(r, cfg, "127.0.0.1:0", 2).expect("start server"))
}

/// The default server most tests share (started once).
fn shared_server() -> Option<SocketAddr> {
    static S: OnceLock<Option<(SocketAddr, &'static RunningServer)>> = OnceLock::new();
    S.get_or_init(|| {
        let s = start(ServerConfig {
            max_documents: 50,
            max_body_bytes: 256 * 1024,
            prune: reranker()?.prune_config().clone(),
            ..Default::default()
        })?;
        let leaked: &'static RunningServer = Box::leak(Box::new(s));
        Some((leaked.addr, leaked))
    })
    .map(|(a, _)| a)
}

fn alone(query: &str, docs: &[String], top_n: Option<usize>) -> Vec<(usize, f32)> {
    let r = reranker().unwrap();
    let mut req = Req::new(query, docs.to_vec());
    req.opts.top_k = top_n;
    req.opts.mode = Mode::Grating;
    req.opts.prune = Some(r.prune_config().clone());
    common::ranked(&r, &req)
}

#[test]
fn rerank_endpoints_answer_in_each_shape() {
    let Some(addr) = shared_server() else { return };
    let docs = passages(12);
    let q = "what is the daily life of thai people";
    let expect = alone(q, &docs, Some(3));

    // Cohere v1 / Jina: strings, top_n, return_documents, the client's request id echoed.
    let r = post_json(
        addr,
        "/v1/rerank",
        &json!({"model": "x", "query": q, "documents": docs, "top_n": 3, "return_documents": true}),
        &[("x-request-id", "test-req-1")],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some("test-req-1"));
    let v = r.json().unwrap();
    assert_eq!(v["id"], "test-req-1");
    assert_eq!(v["meta"]["api_version"]["version"], "1");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
    let res = v["results"].as_array().unwrap();
    assert_eq!(res.len(), 3);
    for (got, (idx, logit)) in res.iter().zip(&expect) {
        assert_eq!(got["index"].as_u64().unwrap() as usize, *idx);
        let s = got["relevance_score"].as_f64().unwrap() as f32;
        assert!(
            (s - sigmoid(*logit)).abs() < 1e-6,
            "{s} vs {}",
            sigmoid(*logit)
        );
        assert_eq!(got["document"]["text"], docs[*idx]);
    }

    // Cohere v2: {"text"} objects, no documents returned, a generated request id.
    let objs: Vec<Value> = docs.iter().map(|d| json!({"text": d})).collect();
    let r = post_json(
        addr,
        "/v2/rerank",
        &json!({"query": q, "documents": objs, "top_n": 3}),
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    let id = r.header("x-request-id").unwrap();
    assert_eq!(v["id"], id);
    assert_eq!(id.len(), 32);
    assert_eq!(v["meta"]["api_version"]["version"], "2");
    let got: Vec<usize> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["index"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(got, expect.iter().map(|e| e.0).collect::<Vec<_>>());
    assert!(v["results"][0].get("document").is_none());

    // No top_n: every document, sorted.
    let r = post_json(
        addr,
        "/v1/rerank",
        &json!({"query": q, "documents": docs}),
        &[],
    )
    .unwrap();
    let v = r.json().unwrap();
    let scores: Vec<f64> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["relevance_score"].as_f64().unwrap())
        .collect();
    assert_eq!(scores.len(), docs.len());
    assert!(scores.windows(2).all(|w| w[0] >= w[1]));

    // TEI: a bare sorted array, raw scores and texts on request.
    let full = alone(q, &docs, None);
    let r = post_json(
        addr,
        "/rerank",
        &json!({"query": q, "texts": docs, "raw_scores": true, "return_text": true}),
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), docs.len());
    for (got, (idx, logit)) in arr.iter().zip(&full) {
        assert_eq!(got["index"].as_u64().unwrap() as usize, *idx);
        assert!((got["score"].as_f64().unwrap() as f32 - logit).abs() < 1e-5);
        assert_eq!(got["text"], docs[*idx]);
    }
    let r = post_json(
        addr,
        "/rerank",
        &json!({"query": q, "texts": docs, "truncation_direction": "Left"}),
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    assert!(v[0].get("text").is_none());
    let s = v[0]["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&s));
}

#[test]
fn info_health_metrics_and_docs() {
    let Some(addr) = shared_server() else { return };
    let r = get(addr, "/health", &[]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json().unwrap()["status"], "ok");
    let v = get(addr, "/info", &[]).unwrap().json().unwrap();
    assert!(v["architecture"].as_str().unwrap().contains("Bert"));
    assert_eq!(v["num_layers"], 6);
    assert_eq!(v["mode"], "grating");
    assert_eq!(v["layer_sharing"], true);
    assert_eq!(v["queue_order"], "shortest-unpruned-aligned");
    assert_eq!(v["limits"]["max_documents"], 50);
    assert!(v["model"].as_str().unwrap().contains(MODEL));

    // One request so the counters move.
    let r = post_json(
        addr,
        "/v1/rerank",
        &json!({"query": "q test", "documents": passages(30), "top_n": 2}),
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let m = get(addr, "/metrics", &[]).unwrap();
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let t = m.text();
    for name in [
        "grating_requests_total{endpoint=\"/v1/rerank\",status=\"200\"}",
        "grating_request_duration_seconds_bucket{endpoint=\"/v1/rerank\",le=\"+Inf\"}",
        "grating_queue_depth",
        "grating_requests_in_flight",
        "grating_candidate_layers_computed_total",
        "grating_candidate_layers_saved_total",
        "grating_layer_steps_total",
        "grating_peak_rss_bytes",
    ] {
        assert!(t.contains(name), "missing {name} in\n{t}");
    }
    let computed: f64 = t
        .lines()
        .find(|l| l.starts_with("grating_candidate_layers_computed_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap();
    assert!(computed > 0.0);

    let spec = get(addr, "/openapi.json", &[]).unwrap().json().unwrap();
    for p in [
        "/v1/rerank",
        "/v2/rerank",
        "/rerank",
        "/health",
        "/info",
        "/metrics",
    ] {
        assert!(spec["paths"][p].is_object(), "spec lacks {p}");
    }
    assert!(spec["components"]["schemas"]["RerankRequest"].is_object());
    let d = get(addr, "/docs", &[]).unwrap();
    assert_eq!(d.status, 200);
    let html = d.text();
    assert!(html.contains("/v1/rerank") && html.contains("/openapi.json"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the docs page must load nothing from the network"
    );
}

#[test]
fn bad_requests_get_json_errors_and_the_server_keeps_serving() {
    let Some(addr) = shared_server() else { return };
    let ct = [("Content-Type", "application/json")];
    let raw = |body: &str| request(addr, "POST", "/v1/rerank", &ct, Some(body.as_bytes())).unwrap();
    assert_error(
        &raw("{\"query\": \"q\", \"documents\": [\"a\""),
        400,
        "invalid_json",
    );
    assert_error(&raw("not json"), 400, "invalid_json");
    assert_error(&raw(""), 400, "invalid_json");
    assert_error(
        &raw("{\"query\": 5, \"documents\": [\"a\"]}"),
        422,
        "invalid_request",
    );
    assert_error(
        &raw("{\"query\": \"q\", \"documents\": [1, 2]}"),
        422,
        "invalid_request",
    );
    assert_error(
        &raw("{\"query\": \"q\", \"documents\": [\"a\"], \"top_n\": -1}"),
        422,
        "invalid_request",
    );
    assert_error(&raw("{\"documents\": [\"a\"]}"), 422, "invalid_request");
    assert_error(
        &raw("{\"query\": \"q\", \"documents\": []}"),
        400,
        "empty_input",
    );
    assert_error(
        &raw("{\"query\": \"  \", \"documents\": [\"a\"]}"),
        400,
        "empty_input",
    );
    let tei = |body: Value| post_json(addr, "/rerank", &body, &[]).unwrap();
    assert_error(&tei(json!({"query": "q", "texts": []})), 400, "empty_input");
    assert_error(
        &tei(json!({"query": "q", "texts": "abc"})),
        422,
        "invalid_request",
    );
    assert_error(
        &tei(json!({"query": "q", "texts": ["a"], "truncation_direction": "up"})),
        422,
        "invalid_request",
    );
    // Limits: too many documents, too large a body, an over-long document with truncation off.
    let many: Vec<String> = (0..51).map(|i| format!("doc {i}")).collect();
    assert_error(
        &post_json(
            addr,
            "/v1/rerank",
            &json!({"query": "q", "documents": many}),
            &[],
        )
        .unwrap(),
        413,
        "too_many_documents",
    );
    let huge = "word ".repeat(60_000);
    assert_error(
        &post_json(
            addr,
            "/v1/rerank",
            &json!({"query": "q", "documents": [huge]}),
            &[],
        )
        .unwrap(),
        413,
        "payload_too_large",
    );
    let long = "word ".repeat(1000);
    assert_error(
        &tei(json!({"query": "q", "texts": [long], "truncate": false})),
        413,
        "document_too_long",
    );
    // The same long document is cut when truncation is on (the default).
    assert_eq!(tei(json!({"query": "q", "texts": [long]})).status, 200);
    // Unknown endpoint, wrong method.
    assert_error(&get(addr, "/v3/rerank", &[]).unwrap(), 404, "not_found");
    assert_error(
        &get(addr, "/v1/rerank", &[]).unwrap(),
        405,
        "method_not_allowed",
    );
    // Still serving.
    let r = post_json(
        addr,
        "/v1/rerank",
        &json!({"query": "q", "documents": ["a", "b"], "top_n": 1}),
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn max_tokens_per_doc_cuts_documents() {
    let Some(addr) = shared_server() else { return };
    let docs = vec!["word ".repeat(600)];
    let full = post_json(
        addr,
        "/v2/rerank",
        &json!({"query": "q", "documents": docs}),
        &[],
    )
    .unwrap()
    .json()
    .unwrap();
    let cut = post_json(
        addr,
        "/v2/rerank",
        &json!({"query": "q", "documents": docs, "max_tokens_per_doc": 16}),
        &[],
    )
    .unwrap()
    .json()
    .unwrap();
    assert_eq!(full["usage"]["total_tokens"], 512);
    // 16 document tokens + 1 query token + 3 template tokens.
    assert_eq!(cut["usage"]["total_tokens"], 20);
}

#[test]
fn concurrent_requests_get_the_answers_they_get_alone() {
    let Some(addr) = shared_server() else { return };
    let all = passages(200);
    let cases: Vec<(String, Vec<String>, Option<usize>)> = vec![
        (
            "what is the daily life of thai people".into(),
            all[0..40].to_vec(),
            Some(5),
        ),
        (
            "causes of left ventricular hypertrophy".into(),
            all[40..50].to_vec(),
            Some(3),
        ),
        (
            "how long is life cycle of flea".into(),
            all[50..50 + 48].to_vec(),
            None,
        ),
        (
            "what is physical description of spruce".into(),
            all[100..108].to_vec(),
            Some(1),
        ),
        (
            "anthropological definition of environment".into(),
            all[108..150].to_vec(),
            Some(10),
        ),
        (
            "tracheids are part of".into(),
            all[150..170].to_vec(),
            Some(2),
        ),
    ];
    let expected: Vec<Vec<(usize, f32)>> = cases.iter().map(|(q, d, k)| alone(q, d, *k)).collect();
    for round in 0..2 {
        let got: Vec<Value> = std::thread::scope(|s| {
            let hs: Vec<_> = cases
                .iter()
                .map(|(q, d, k)| {
                    s.spawn(move || {
                        let mut body = json!({"query": q, "documents": d});
                        if let Some(k) = k {
                            body["top_n"] = json!(k);
                        }
                        let r = post_json(addr, "/v1/rerank", &body, &[]).unwrap();
                        assert_eq!(r.status, 200, "{}", r.text());
                        r.json().unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (v, exp)) in got.iter().zip(&expected).enumerate() {
            let res = v["results"].as_array().unwrap();
            assert_eq!(res.len(), exp.len(), "round {round} case {i}");
            for (g, (idx, logit)) in res.iter().zip(exp) {
                assert_eq!(
                    g["index"].as_u64().unwrap() as usize,
                    *idx,
                    "round {round} case {i}"
                );
                let s = g["relevance_score"].as_f64().unwrap() as f32;
                assert_eq!(s, sigmoid(*logit), "round {round} case {i}");
            }
        }
    }
}

#[test]
fn api_key_is_required_when_set() {
    let Some(server) = start(ServerConfig {
        api_key: Some("s3cret-key".into()),
        ..Default::default()
    }) else {
        return;
    };
    let addr = server.addr;
    let body = json!({"query": "q", "documents": ["a", "b"]});
    assert_error(
        &post_json(addr, "/v1/rerank", &body, &[]).unwrap(),
        401,
        "unauthorized",
    );
    assert_error(
        &post_json(
            addr,
            "/v1/rerank",
            &body,
            &[("Authorization", "Bearer wrong")],
        )
        .unwrap(),
        401,
        "unauthorized",
    );
    assert_error(
        &post_json(
            addr,
            "/rerank",
            &json!({"query": "q", "texts": ["a"]}),
            &[("Authorization", "Bearer s3cret-ke")],
        )
        .unwrap(),
        401,
        "unauthorized",
    );
    assert_error(&get(addr, "/metrics", &[]).unwrap(), 401, "unauthorized");
    assert_error(&get(addr, "/info", &[]).unwrap(), 401, "unauthorized");
    let ok = post_json(
        addr,
        "/v1/rerank",
        &body,
        &[("Authorization", "Bearer s3cret-key")],
    )
    .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(
        get(addr, "/info", &[("Authorization", "Bearer s3cret-key")])
            .unwrap()
            .status,
        200
    );
    assert_eq!(get(addr, "/health", &[]).unwrap().status, 200);
    assert_eq!(get(addr, "/openapi.json", &[]).unwrap().status, 200);
    server.stop().unwrap();
}

fn metric(addr: SocketAddr, name: &str) -> f64 {
    let t = get(addr, "/metrics", &[]).unwrap().text();
    t.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn wait_in_flight(addr: SocketAddr, n: f64) {
    let t = Instant::now();
    while metric(addr, "grating_requests_in_flight") < n {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "request never became in flight"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A request that keeps the engine busy for a while: many documents, no top_n (no pruning).
fn big_body() -> Value {
    json!({"query": "what is the daily life of thai people", "documents": passages(400)})
}

#[test]
fn overload_gets_429_and_timeouts_get_503() {
    let Some(server) = start(ServerConfig {
        max_concurrent_requests: 1,
        max_documents: 1000,
        // Long enough for a two-document request on a loaded 2-core machine, far too short for
        // the 400-document one (about 770 GFLOP with no pruning, seconds on 2 cores).
        request_timeout: Duration::from_millis(1000),
        ..Default::default()
    }) else {
        return;
    };
    let addr = server.addr;
    std::thread::scope(|s| {
        let big = s.spawn(|| post_json(addr, "/v1/rerank", &big_body(), &[]).unwrap());
        wait_in_flight(addr, 1.0);
        let r = post_json(
            addr,
            "/v1/rerank",
            &json!({"query": "q", "documents": ["a"]}),
            &[],
        )
        .unwrap();
        assert_error(&r, 429, "overloaded");
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_error(&big.join().unwrap(), 503, "timeout");
    });
    // The engine dropped the timed-out request; the server keeps serving.
    let t = Instant::now();
    loop {
        let r = post_json(
            addr,
            "/v1/rerank",
            &json!({"query": "q", "documents": ["a", "b"]}),
            &[],
        )
        .unwrap();
        if r.status == 200 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{}", r.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = get(addr, "/metrics", &[]).unwrap().text();
    assert!(
        t.contains("status=\"429\"") && t.contains("status=\"503\""),
        "{t}"
    );
    server.stop().unwrap();
}

#[test]
fn shutdown_cancels_what_does_not_finish_in_the_grace_period() {
    let Some(server) = start(ServerConfig {
        max_documents: 1000,
        shutdown_grace: Duration::ZERO,
        ..Default::default()
    }) else {
        return;
    };
    let addr = server.addr;
    std::thread::scope(|s| {
        let big = s.spawn(|| post_json(addr, "/v1/rerank", &big_body(), &[]).unwrap());
        wait_in_flight(addr, 1.0);
        let t = Instant::now();
        server.stop().unwrap();
        assert!(t.elapsed() < Duration::from_secs(20));
        assert_error(&big.join().unwrap(), 503, "cancelled");
    });
    assert!(
        get(addr, "/health", &[]).is_err(),
        "the listener should be closed"
    );
}

#[test]
fn sigterm_finishes_in_flight_requests_and_exits_cleanly() {
    use std::io::{BufRead, BufReader, Read};
    let Some(dir) = common::shared_model(MODEL) else {
        return;
    };
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_grating"))
        .args([
            "serve",
            "--model",
            dir.to_str().unwrap(),
            "--port",
            "0",
            "--threads",
            "1",
            "--log-json",
        ])
        .env("GRATING_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: SocketAddr = line
        .trim()
        .rsplit("http://")
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("{line:?}"));
    let mut stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let body = json!({"query": "what is the daily life of thai people", "documents": passages(60), "top_n": 3});
    let inflight = std::thread::spawn(move || {
        post_json(
            addr,
            "/v1/rerank",
            &body,
            &[("x-request-id", "sigterm-test")],
        )
        .unwrap()
    });
    wait_in_flight(addr, 1.0);
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let r = inflight.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["results"].as_array().unwrap().len(), 3);
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let logs = logs.join().unwrap();
    assert!(
        logs.contains("sigterm-test"),
        "request id missing from the logs:\n{logs}"
    );
    assert!(logs.contains("SIGTERM"), "{logs}");
}

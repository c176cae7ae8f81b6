//! The rerank server on the committed tiny XLM-R fixture, so these run on every machine
//! (no `../shared` needed): each endpoint answers in its shape, bad requests get 4xx JSON errors
//! without stopping the server, `top_n: 0` is refused, and a fault of the engine's weight file
//! is a 5xx, never blamed on the caller.

mod common;

use common::{assert_error, Req};
use grating::server::client::{get, post_json, request};
use grating::server::{RunningServer, ServerConfig};
use grating::{sigmoid, EngineOptions, Reranker, WeightsMode};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

const FIXTURE: &str = "xlm-roberta-tiny";

fn load(dir: &Path, opts: &EngineOptions) -> Arc<Reranker> {
    Arc::new(Reranker::load(dir.to_str().unwrap(), opts).expect("load the fixture model"))
}

fn reranker() -> Arc<Reranker> {
    static R: OnceLock<Arc<Reranker>> = OnceLock::new();
    R.get_or_init(|| load(&common::fixture(FIXTURE), &common::isolated_options()))
        .clone()
}

/// The server most tests share (started once, never stopped).
fn server() -> SocketAddr {
    static S: OnceLock<&'static RunningServer> = OnceLock::new();
    S.get_or_init(|| {
        let cfg = ServerConfig {
            max_documents: 20,
            max_body_bytes: 64 * 1024,
            ..Default::default()
        };
        let s = RunningServer::start(reranker(), cfg, "127.0.0.1:0", 2).expect("start server");
        Box::leak(Box::new(s))
    })
    .addr
}

fn documents() -> Vec<String> {
    common::read_reference(&common::fixture(FIXTURE).join("reference.jsonl"))
        .into_iter()
        .map(|r| r.document)
        .collect()
}

const QUERY: &str = "what is the boiling point of water";

/// `(index, logit)` of the library's answer, best first.
fn alone(docs: &[String], top_n: Option<usize>) -> Vec<(usize, f32)> {
    let mut req = Req::new(QUERY, docs.to_vec());
    req.opts.top_k = top_n;
    common::ranked(&reranker(), &req)
}

fn indices(results: &Value) -> Vec<usize> {
    results
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["index"].as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn fixture_endpoints_answer_in_each_shape() {
    let addr = server();
    let docs = documents();
    let top3 = alone(&docs, Some(3));

    // Cohere v1: top_n, documents returned, scores the library's, the request id echoed.
    let r = post_json(
        addr,
        "/v1/rerank",
        &json!({"query": QUERY, "documents": docs, "top_n": 3, "return_documents": true}),
        &[("x-request-id", "fixture-1")],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some("fixture-1"));
    let v = r.json().unwrap();
    assert_eq!(v["id"], "fixture-1");
    assert_eq!(v["meta"]["api_version"]["version"], "1");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
    let res = v["results"].as_array().unwrap();
    assert_eq!(res.len(), 3);
    for (got, (idx, logit)) in res.iter().zip(&top3) {
        assert_eq!(got["index"].as_u64().unwrap() as usize, *idx);
        let s = got["relevance_score"].as_f64().unwrap() as f32;
        assert!((s - sigmoid(*logit)).abs() < 1e-6, "{s} vs {logit}");
        assert_eq!(got["document"]["text"], docs[*idx]);
    }

    // Cohere v2: {"text"} objects; without top_n every document, sorted, none echoed.
    let objs: Vec<Value> = docs.iter().map(|d| json!({"text": d})).collect();
    let r = post_json(
        addr,
        "/v2/rerank",
        &json!({"query": QUERY, "documents": objs}),
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    assert_eq!(v["meta"]["api_version"]["version"], "2");
    let all = alone(&docs, None);
    assert_eq!(
        indices(&v["results"]),
        all.iter().map(|e| e.0).collect::<Vec<_>>()
    );
    assert!(v["results"][0].get("document").is_none());

    // TEI: a bare sorted array with raw logits and texts on request.
    let r = post_json(
        addr,
        "/rerank",
        &json!({"query": QUERY, "texts": docs, "raw_scores": true, "return_text": true, "top_n": 2}),
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    for (got, (idx, logit)) in arr.iter().zip(&top3) {
        assert_eq!(got["index"].as_u64().unwrap() as usize, *idx);
        assert!((got["score"].as_f64().unwrap() as f32 - logit).abs() < 1e-5);
        assert_eq!(got["text"], docs[*idx]);
    }

    // The endpoints around reranking.
    let h = get(addr, "/health", &[]).unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.json().unwrap()["status"], "ok");
    let info = get(addr, "/info", &[]).unwrap().json().unwrap();
    assert!(
        info["architecture"]
            .as_str()
            .unwrap()
            .contains("XLMRoberta"),
        "{info}"
    );
    assert_eq!(info["num_layers"], 3);
    assert_eq!(info["weights"], "resident");
    assert_eq!(info["limits"]["max_documents"], 20);
    let m = get(addr, "/metrics", &[]).unwrap();
    assert_eq!(m.status, 200);
    assert!(m
        .text()
        .contains("grating_requests_total{endpoint=\"/v1/rerank\",status=\"200\"}"));
    let spec = get(addr, "/openapi.json", &[]).unwrap().json().unwrap();
    for p in ["/v1/rerank", "/v2/rerank", "/rerank", "/health", "/info"] {
        assert!(spec["paths"][p].is_object(), "spec lacks {p}");
    }
    assert!(spec["paths"]["/v1/rerank"]["post"]["responses"]["500"].is_object());
    assert!(
        spec["paths"]["/v1/models"].is_object(),
        "spec lacks /v1/models"
    );
    let body = &spec["components"]["schemas"]["RerankRequest"]["properties"];
    assert_eq!(body["query"]["minLength"], 1, "{body}");
    assert!(
        body["texts"].to_string().contains("\"minItems\":1"),
        "{body}"
    );
    let err = &spec["components"]["schemas"]["ErrorBody"]["properties"];
    for field in ["error", "error_type", "detail", "message"] {
        assert!(err[field].is_object(), "ErrorBody lacks {field}");
    }
    let d = get(addr, "/docs", &[]).unwrap();
    assert_eq!(d.status, 200);
    assert!(d.text().contains("/v1/rerank"));
}

/// What the clients that failed against earlier versions send (issue 20): the Cohere/Jina body
/// at the root path (Infinity, vLLM, LocalAI, Dify and Open WebUI with a root URL), the TEI
/// body at `/v1/rerank` (litellm `huggingface/` with a `/v1` base), a trailing slash, booleans
/// as strings (RAGFlow's Xinference client), object documents with `rank_fields`, TEI's `/info`
/// check (Dify) and `/v1/models`.
#[test]
fn fixture_every_rerank_path_takes_every_shape() {
    let addr = server();
    let docs = documents();
    let top3 = alone(&docs, Some(3));
    let order3: Vec<usize> = top3.iter().map(|e| e.0).collect();

    // The Cohere body at every path answers in the Cohere shape.
    for path in ["/rerank", "/rerank/", "/v1/rerank/", "/v2/rerank/"] {
        let r = post_json(
            addr,
            path,
            &json!({"model": "any", "query": QUERY, "documents": docs, "top_n": 3.0, "return_documents": "true"}),
            &[],
        )
        .unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let v = r.json().unwrap();
        assert_eq!(indices(&v["results"]), order3, "{path}");
        assert_eq!(v["results"][0]["document"]["text"], docs[order3[0]]);
        // The served name, never the fixture's absolute path.
        assert_eq!(v["model"], FIXTURE, "{path}");
    }
    // The TEI body at every path answers in TEI's shape.
    for path in ["/v1/rerank", "/v2/rerank", "/rerank/"] {
        let r = post_json(
            addr,
            path,
            &json!({"query": QUERY, "texts": docs, "top_n": 3, "raw_scores": "false", "return_text": true}),
            &[],
        )
        .unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let v = r.json().unwrap();
        assert_eq!(indices(&v), order3, "{path}");
        let s = v[0]["score"].as_f64().unwrap() as f32;
        assert!((s - sigmoid(top3[0].1)).abs() < 1e-6);
        assert_eq!(v[0]["text"], docs[order3[0]]);
    }

    // Object documents are echoed whole; rank_fields picks what is ranked.
    let objs: Vec<Value> = docs
        .iter()
        .enumerate()
        .map(|(i, d)| json!({"id": i, "title": "passage", "body": d}))
        .collect();
    let r = post_json(
        addr,
        "/v2/rerank",
        &json!({"query": QUERY, "documents": objs, "rank_fields": ["body"], "return_documents": true, "raw_scores": true}),
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    let first = &v["results"][0];
    let i = first["index"].as_u64().unwrap() as usize;
    assert_eq!(first["document"], objs[i]);
    // Ranked by "body: <text>", so the order may differ from the plain texts'; the score is
    // the raw logit of that text.
    let ranked_text = format!("body: {}", docs[i]);
    let (_, logit) = alone(&[ranked_text], None)[0];
    assert!((first["relevance_score"].as_f64().unwrap() as f32 - logit).abs() < 1e-4);
    assert_error(
        &post_json(
            addr,
            "/v1/rerank",
            &json!({"query": QUERY, "documents": objs}),
            &[],
        )
        .unwrap(),
        400,
        "invalid_request",
    );
    let r = post_json(
        addr,
        "/v1/rerank",
        &json!({"query": QUERY, "documents": ["a", {"title": "b"}], "rank_fields": ["title", "year"]}),
        &[],
    )
    .unwrap();
    assert_error(&r, 400, "invalid_request");
    let msg = r.json().unwrap()["detail"].as_str().unwrap().to_string();
    assert!(
        msg.contains("documents[1]") && msg.contains("`year`"),
        "{msg}"
    );

    // Strict where it matters: no wrap-around, no silent rounding, one shape per body.
    for body in [
        json!({"query": "q", "documents": ["a"], "max_tokens_per_doc": 18446744073709551611u64}),
        json!({"query": "q", "documents": ["a"], "top_n": 1.5}),
        json!({"query": "q", "documents": ["a"], "texts": ["a"]}),
        json!({"query": "q", "documents": ["a"], "return_documents": "maybe"}),
    ] {
        assert_error(
            &post_json(addr, "/rerank", &body, &[]).unwrap(),
            422,
            "invalid_request",
        );
    }

    // TEI's /info fields beside ours, and the OpenAI model list.
    let info = get(addr, "/info", &[]).unwrap().json().unwrap();
    assert_eq!(info["model"], FIXTURE);
    assert_eq!(info["model_id"], FIXTURE);
    assert!(
        info["model_type"]["reranker"]["id2label"].is_object(),
        "{info}"
    );
    assert_eq!(info["max_client_batch_size"], 20);
    assert!(info["max_input_length"].as_u64().unwrap() > 0);
    let models = get(addr, "/v1/models", &[]).unwrap().json().unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], FIXTURE);
    assert_eq!(models["data"][0]["object"], "model");
}

/// A per-request `instruction` reaches a decoder reranker's prompt (the committed Qwen3
/// fixture): the server's scores equal the library's with the same instruction, and differ
/// from those with the model's default one.
#[test]
fn fixture_instruction_reaches_a_decoder_reranker() {
    let r = load(&common::fixture("qwen3-tiny"), &common::isolated_options());
    let s = RunningServer::start(r.clone(), ServerConfig::default(), "127.0.0.1:0", 2)
        .expect("start server");
    let docs = documents();
    let instruction = "Given a question, find passages that state a temperature";
    let mut logits = Vec::new();
    for inst in [None, Some(instruction)] {
        let mut req = Req::new(QUERY, docs.clone());
        req.opts.instruction = inst.map(String::from);
        let want = common::ranked(&r, &req);
        let mut body = json!({"query": QUERY, "texts": docs, "raw_scores": true});
        if let Some(i) = inst {
            body["instruction"] = json!(i);
        }
        let resp = post_json(s.addr, "/rerank", &body, &[]).unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        let got = resp.json().unwrap();
        assert_eq!(indices(&got), want.iter().map(|e| e.0).collect::<Vec<_>>());
        for (g, (_, logit)) in got.as_array().unwrap().iter().zip(&want) {
            assert!((g["score"].as_f64().unwrap() as f32 - logit).abs() < 1e-4);
        }
        let mut by_index = want.clone();
        by_index.sort_by_key(|e| e.0);
        logits.push(by_index);
    }
    assert!(
        logits[0]
            .iter()
            .zip(&logits[1])
            .any(|(a, b)| (a.1 - b.1).abs() > 1e-4),
        "the instruction changed no score"
    );
    s.stop().unwrap();
}

/// Rerank bodies must be declared JSON (a browser page can post `text/plain` across origins
/// without a preflight) and uncompressed; the auth scheme is case-insensitive; a blank key
/// is a start-up error, never "auth off".
#[test]
fn fixture_media_types_and_auth_rules() {
    let addr = server();
    let body = br#"{"query": "q", "documents": ["a", "b"]}"#;
    let post = |headers: &[(&str, &str)]| {
        request(addr, "POST", "/v1/rerank", headers, Some(body.as_slice())).unwrap()
    };
    assert_eq!(post(&[("Content-Type", "application/json")]).status, 200);
    assert_eq!(
        post(&[("Content-Type", "Application/JSON; charset=utf-8")]).status,
        200
    );
    for headers in [
        vec![("Content-Type", "text/plain")],
        vec![("Content-Type", "application/x-www-form-urlencoded")],
        vec![],
        vec![
            ("Content-Type", "application/json"),
            ("Content-Encoding", "gzip"),
        ],
    ] {
        assert_error(&post(&headers), 415, "unsupported_media_type");
    }

    let keyed = |key: &str| {
        RunningServer::start(
            reranker(),
            ServerConfig {
                api_key: Some(key.into()),
                ..Default::default()
            },
            "127.0.0.1:0",
            1,
        )
    };
    for blank in ["", "   "] {
        let e = keyed(blank).err().expect("a blank key is refused");
        assert!(e.to_string().contains("blank"), "{e}");
    }
    let s = keyed("s3cret").expect("start server");
    let ct = ("Content-Type", "application/json");
    for (auth, status) in [
        ("Bearer s3cret", 200),
        ("BEARER s3cret", 200),
        ("bearer  s3cret ", 200),
        ("Basic s3cret", 401),
        ("Bearer s3cre", 401),
        ("Bearers3cret", 401),
    ] {
        let r = request(
            s.addr,
            "POST",
            "/rerank",
            &[ct, ("Authorization", auth)],
            Some(body.as_slice()),
        )
        .unwrap();
        assert_eq!(r.status, status, "{auth}: {}", r.text());
    }
    // Without the key the media type is not even looked at.
    let r = request(
        s.addr,
        "POST",
        "/rerank",
        &[("Content-Type", "text/plain")],
        Some(body.as_slice()),
    )
    .unwrap();
    assert_error(&r, 401, "unauthorized");
    s.stop().unwrap();
}

/// Readiness follows the engine: 200 while requests will be served, 503 `not_ready` once the
/// engine stops taking them, while liveness (`/health`) stays 200.
#[test]
fn fixture_readiness_follows_the_engine() {
    let s = RunningServer::start(reranker(), ServerConfig::default(), "127.0.0.1:0", 1)
        .expect("start server");
    let r = get(s.addr, "/ready", &[]).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["status"], "ready");
    s.state.engine().cancel_all();
    assert_error(&get(s.addr, "/ready", &[]).unwrap(), 503, "not_ready");
    assert_eq!(get(s.addr, "/health", &[]).unwrap().status, 200);
    let r = post_json(
        s.addr,
        "/v1/rerank",
        &json!({"query": "q", "documents": ["a"]}),
        &[],
    )
    .unwrap();
    assert_error(&r, 503, "cancelled");
    s.stop().unwrap();
}

/// A declared body over the limit is refused from its header, with no byte of the body sent
/// (not held until the client gives up).
#[test]
fn fixture_oversized_content_length_is_refused_from_the_header() {
    use std::io::{Read, Write};
    let addr = server();
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    c.write_all(
        b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 52428800\r\n\r\n",
    )
    .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = c.read(&mut answer).expect("an answer before any body byte");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
}

/// A shutdown ends within the grace (plus a second) even while clients hold half-sent
/// requests open and never finish them.
#[test]
fn fixture_shutdown_is_bounded_whatever_clients_do() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let s = RunningServer::start(
        reranker(),
        ServerConfig {
            shutdown_grace: Duration::from_millis(300),
            ..Default::default()
        },
        "127.0.0.1:0",
        1,
    )
    .expect("start server");
    let stalled: Vec<std::net::TcpStream> = (0..5)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(s.addr).unwrap();
            c.write_all(
                b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"query\": ",
            )
            .unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = done_tx.send(s.stop());
    });
    let stopped = done_rx.recv_timeout(Duration::from_secs(20));
    let took = started.elapsed();
    assert!(
        matches!(stopped, Ok(Ok(()))),
        "the server did not stop within 20 s with half-sent requests open ({stopped:?})"
    );
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    drop(stalled);
}

#[test]
fn fixture_bad_requests_get_4xx_json_errors_and_the_server_keeps_serving() {
    let addr = server();
    let ct = [("Content-Type", "application/json")];
    let raw = |body: &str| request(addr, "POST", "/v1/rerank", &ct, Some(body.as_bytes())).unwrap();
    assert_error(
        &raw("{\"query\": \"q\", \"documents\": [\"a\""),
        400,
        "invalid_json",
    );
    assert_error(&raw(""), 400, "invalid_json");
    assert_error(
        &raw("{\"query\": 5, \"documents\": [\"a\"]}"),
        422,
        "invalid_request",
    );
    assert_error(&raw("{\"documents\": [\"a\"]}"), 422, "invalid_request");
    assert_error(
        &raw("{\"query\": \"q\", \"documents\": [\"a\"], \"top_n\": -1}"),
        422,
        "invalid_request",
    );
    assert_error(
        &raw("{\"query\": \"q\", \"documents\": []}"),
        400,
        "empty_input",
    );
    assert_error(
        &raw("{\"query\": \" \", \"documents\": [\"a\"]}"),
        400,
        "empty_input",
    );
    let many: Vec<String> = (0..21).map(|i| format!("doc {i}")).collect();
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
    let huge = "word ".repeat(20_000);
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
    let long = "water boils at sea level ".repeat(100);
    let tei = |body: Value| post_json(addr, "/rerank", &body, &[]).unwrap();
    assert_error(
        &tei(json!({"query": "q", "texts": [long], "truncate": false})),
        413,
        "document_too_long",
    );
    assert_error(
        &tei(json!({"query": "q", "texts": "abc"})),
        422,
        "invalid_request",
    );
    assert_error(&get(addr, "/v3/rerank", &[]).unwrap(), 404, "not_found");
    assert_error(
        &get(addr, "/v1/rerank", &[]).unwrap(),
        405,
        "method_not_allowed",
    );

    // K = 0 is refused in every shape, with a message that says how to ask for all.
    for (path, body) in [
        (
            "/v1/rerank",
            json!({"query": "q", "documents": ["a", "b"], "top_n": 0}),
        ),
        (
            "/v2/rerank",
            json!({"query": "q", "documents": [{"text": "a"}], "top_n": 0}),
        ),
        (
            "/rerank",
            json!({"query": "q", "texts": ["a", "b"], "top_n": 0}),
        ),
    ] {
        let r = post_json(addr, path, &body, &[]).unwrap();
        assert_error(&r, 422, "invalid_request");
        let msg = r.json().unwrap()["error"].as_str().unwrap().to_string();
        assert!(
            msg.contains("top_n") && msg.contains("omit"),
            "{path}: {msg}"
        );
    }

    // Still serving; the long text is cut when truncation is on (the default).
    assert_eq!(tei(json!({"query": "q", "texts": [long]})).status, 200);
    let r = post_json(
        addr,
        "/v1/rerank",
        &json!({"query": "q", "documents": ["a", "b"], "top_n": 1}),
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["results"].as_array().unwrap().len(), 1);
}

/// A copy of the fixture in a fresh temporary directory, removed on drop.
struct TempModel(std::path::PathBuf);

impl TempModel {
    fn new() -> TempModel {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "grating-server-fault-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(common::fixture(FIXTURE)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        TempModel(dir)
    }
}

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where the layers' bytes begin in a safetensors file: cutting it there leaves the embeddings
/// and the head readable, so only layer reads fail.
fn first_layer_byte(file: &Path) -> u64 {
    let bytes = std::fs::read(file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len as usize]).unwrap();
    let (mut layers_start, mut others_end) = (u64::MAX, 0);
    for (name, t) in header.as_object().unwrap() {
        let Some(offsets) = t["data_offsets"].as_array() else {
            continue; // __metadata__
        };
        let (start, end) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
        if name.contains(".layer.") {
            layers_start = layers_start.min(start);
        } else {
            others_end = others_end.max(end);
        }
    }
    assert!(others_end <= layers_start, "the layers are not stored last");
    8 + header_len + layers_start
}

/// Serves a streamed copy of the fixture, answers one request, cuts the copy's weight file to
/// `cut(file)` bytes in place (the server's open descriptor then reads past its end), and checks
/// that rerank requests get a 500 naming the file while everything else keeps working. Returns
/// the error bodies.
fn fault_after_cutting_weights(cut: impl Fn(&Path) -> u64) -> Vec<Value> {
    let model = TempModel::new();
    let weights = model.0.join("model.safetensors");
    let streamed = load(
        &model.0,
        &EngineOptions {
            weights: WeightsMode::Stream,
            ..common::isolated_options()
        },
    );
    // One cached layer: the read-ahead and the cache together hold fewer layers than the model
    // has, so a request after the damage must read a layer from the file.
    let cfg = ServerConfig {
        cached_layers: 1,
        ..Default::default()
    };
    let server = RunningServer::start(streamed, cfg, "127.0.0.1:0", 2).expect("start server");
    let addr = server.addr;
    let body = json!({"query": QUERY, "documents": documents(), "top_n": 2});
    let ok = post_json(addr, "/v1/rerank", &body, &[]).unwrap();
    assert_eq!(
        ok.status,
        200,
        "the intact copy should serve: {}",
        ok.text()
    );
    assert_eq!(
        get(addr, "/info", &[]).unwrap().json().unwrap()["weights"],
        "stream"
    );

    let len = cut(&weights);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len)
        .unwrap();

    let mut errors = Vec::new();
    for attempt in 0..2 {
        let r = post_json(addr, "/v1/rerank", &body, &[]).unwrap();
        assert_eq!(
            r.status,
            500,
            "attempt {attempt}: a damaged weight file is the server's fault: {}",
            r.text()
        );
        let v = r
            .json()
            .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {}", r.text()));
        eprintln!("attempt {attempt}: {v}");
        let kind = v["error_type"].as_str().unwrap();
        assert!(
            ["internal", "model_files", "io", "backend"].contains(&kind),
            "attempt {attempt}: unexpected error_type {kind:?}: {v}"
        );
        assert!(
            v["error"].as_str().unwrap().contains("model.safetensors"),
            "the error should name the damaged file: {v}"
        );
        assert!(r.header("x-request-id").is_some());
        errors.push(v);
    }

    // Liveness, the rest of the API and the request checks are unaffected.
    let h = get(addr, "/health", &[]).unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.json().unwrap()["status"], "ok");
    assert_error(
        &post_json(
            addr,
            "/v1/rerank",
            &json!({"query": "q", "documents": []}),
            &[],
        )
        .unwrap(),
        400,
        "empty_input",
    );
    let metrics = get(addr, "/metrics", &[]).unwrap().text();
    assert!(
        metrics.contains("grating_requests_total{endpoint=\"/v1/rerank\",status=\"500\"}"),
        "{metrics}"
    );
    server.stop().unwrap();
    errors
}

/// The layer reads of a running server fail (the file is cut where the layers begin).
#[test]
fn fixture_failed_layer_read_is_a_5xx_and_the_server_keeps_serving() {
    let errors = fault_after_cutting_weights(first_layer_byte);
    for v in errors {
        assert!(v["error"].as_str().unwrap().contains("layer"), "{v}");
    }
}

/// Every weight read fails, the embedding rows' too (the file is cut to nothing).
#[test]
fn fixture_emptied_weight_file_is_a_5xx_and_the_server_keeps_serving() {
    let errors = fault_after_cutting_weights(|_| 0);
    for v in errors {
        assert_eq!(v["error_type"], "model_files", "{v}");
    }
}

/// Self-calibration on a model without a profile: sampled requests are answered as usual
/// (here by full inference, since nothing is pruned until the movement is learned), re-run in
/// idle time, counted in /info and /metrics; an `exact` request is never sampled; what was
/// learned is saved and a restarted reranker starts from it.
#[test]
fn fixture_self_calibration_samples_learns_and_survives_a_restart() {
    use grating::prune::online::LEARN_AFTER;
    let profiles =
        std::env::temp_dir().join(format!("grating-self-calibration-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profiles);
    let opts = EngineOptions {
        profile_dir: Some(profiles.clone()),
        ..Default::default()
    };
    let r = load(&common::fixture(FIXTURE), &opts);
    assert!(
        r.prune_config().movement.is_empty(),
        "the fixture has no profile"
    );
    let cfg = ServerConfig {
        calibration_sample: 1.0,
        ..Default::default()
    };
    let s = RunningServer::start(r, cfg, "127.0.0.1:0", 2).expect("start server");
    let docs = documents();
    let full = alone(&docs, Some(3));
    let full_idx: Vec<usize> = full.iter().map(|x| x.0).collect();
    let ask = |extra: Value| {
        let mut body = json!({"query": QUERY, "documents": docs, "top_n": 3});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = post_json(s.addr, "/v1/rerank", &body, &[]).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        indices(&r.json().unwrap()["results"])
    };
    assert_eq!(ask(json!({"exact": true})), full_idx);
    let asked = LEARN_AFTER + 5;
    for i in 0..asked {
        let got = ask(json!({}));
        // Answers before the LEARN_AFTER-th re-run are unpruned: full inference's.
        if i < LEARN_AFTER {
            assert_eq!(got, full_idx, "request {i}");
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let snap = loop {
        let info = get(s.addr, "/info", &[]).unwrap().json().unwrap();
        let c = info["calibration"].clone();
        assert!(c.is_object(), "/info has no calibration: {info}");
        if c["samples"].as_u64().unwrap() as usize >= asked {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "re-runs did not happen: {c}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(snap["samples"], asked, "the exact request is never sampled");
    assert_eq!(snap["target_agreement"], 0.99);
    let movement = snap["movement"].as_array().unwrap();
    assert!(
        !movement.is_empty() && movement.iter().all(Value::is_number),
        "{snap}"
    );
    let metrics = get(s.addr, "/metrics", &[]).unwrap().text();
    assert!(
        metrics.contains(&format!("grating_calibration_samples_total {asked}")),
        "{metrics}"
    );
    assert!(metrics.contains("grating_prune_margin "), "{metrics}");
    s.stop().unwrap();

    let restarted = load(&common::fixture(FIXTURE), &opts);
    let cfg = restarted.prune_config();
    assert!((cfg.margin - snap["margin"].as_f64().unwrap() as f32).abs() < 1e-6);
    assert_eq!(cfg.movement.len(), movement.len());
    assert!(cfg.movement.iter().all(Option::is_some), "{cfg:?}");
    let _ = std::fs::remove_dir_all(&profiles);
}

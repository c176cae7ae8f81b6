//! `/docs`: a small self-contained HTML page built from the OpenAPI spec. It loads nothing from
//! the network (Swagger UI's assets would have to be downloaded at build time or by the
//! browser), so it works on air-gapped machines.

use utoipa::openapi::OpenApi;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn page(spec: &OpenApi) -> String {
    let mut rows = String::new();
    for (path, item) in spec.paths.paths.iter() {
        let ops = [
            ("GET", item.get.as_ref()),
            ("POST", item.post.as_ref()),
            ("PUT", item.put.as_ref()),
            ("DELETE", item.delete.as_ref()),
        ];
        for (method, op) in ops {
            let Some(op) = op else { continue };
            let summary = op
                .summary
                .clone()
                .or_else(|| op.description.clone())
                .unwrap_or_default();
            let mut codes = String::new();
            for (code, resp) in op.responses.responses.iter() {
                let desc = match resp {
                    utoipa::openapi::RefOr::T(r) => r.description.clone(),
                    utoipa::openapi::RefOr::Ref(r) => r.ref_location.clone(),
                };
                codes.push_str(&format!(
                    "<li><code>{}</code> {}</li>",
                    esc(code),
                    esc(&desc)
                ));
            }
            rows.push_str(&format!(
                "<tr><td><code>{method}</code></td><td><code>{}</code></td><td>{}<ul>{codes}</ul></td></tr>\n",
                esc(path),
                esc(&summary)
            ));
        }
    }
    let title = esc(&spec.info.title);
    let desc = esc(spec.info.description.as_deref().unwrap_or(""));
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>{title} API</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td{{vertical-align:top;padding:.4em;border-bottom:1px solid #ddd}}code{{background:#f4f4f4}}</style>
</head><body>
<h1>{title} API</h1>
<p>{desc}</p>
<p>Machine-readable spec: <a href="/openapi.json">/openapi.json</a> (OpenAPI 3.1). Errors are
<code>{{"error": "...", "error_type": "..."}}</code>; every response carries <code>x-request-id</code>.</p>
<table><tr><th>method</th><th>path</th><th>what and answers</th></tr>
{rows}</table>
<h2>Example</h2>
<pre>curl -s localhost:8080/v1/rerank -H 'content-type: application/json' \
  -d '{{"query":"what is a panda?","documents":["hi","the giant panda is a bear"],"top_n":1}}'</pre>
</body></html>
"#
    )
}

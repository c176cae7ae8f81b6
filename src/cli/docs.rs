//! Reading the candidate documents file: JSON lines (`{"id", "text"}`) or plain text (one
//! document per line).

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct Document {
    pub id: String,
    pub text: String,
}

#[derive(serde::Deserialize)]
struct JsonDoc {
    #[serde(default, alias = "_id")]
    id: Option<serde_json::Value>,
    text: String,
}

/// Reads `path` as jsonl when its name ends in .jsonl/.json or its first non-blank line is a
/// JSON object; otherwise one document per non-empty line, with the line number as id.
pub fn read_documents(path: &Path) -> Result<Vec<Document>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
            bail!("{}: invalid UTF-8 on line {line} (byte {})", path.display(), e.valid_up_to());
        }
    };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let jsonl = matches!(ext, "jsonl" | "json") || first.trim_start().starts_with('{');
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if jsonl {
            let d: JsonDoc = serde_json::from_str(line).map_err(|e| {
                anyhow!("{}: line {}: expected {{\"id\", \"text\"}}: {e}", path.display(), i + 1)
            })?;
            let id = match d.id {
                Some(serde_json::Value::String(s)) => s,
                Some(v) => v.to_string(),
                None => docs.len().to_string(),
            };
            docs.push(Document { id, text: d.text });
        } else {
            docs.push(Document {
                id: docs.len().to_string(),
                text: line.to_string(),
            });
        }
    }
    if docs.is_empty() {
        bail!("{}: no documents (the file is empty)", path.display());
    }
    Ok(docs)
}

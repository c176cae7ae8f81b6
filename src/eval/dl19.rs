//! The TREC DL 2019 passage subset in ../shared/data (BEIR jsonl corpus and queries, qrels tsv).

use super::bm25::Bm25;
use crate::error::{GratingError, Result};
use std::collections::HashMap;
use std::path::Path;

pub struct Dl19 {
    pub doc_ids: Vec<String>,
    pub doc_texts: Vec<String>,
    /// Judged queries only, in file order: (id, text).
    pub queries: Vec<(String, String)>,
    /// query id -> doc id -> grade.
    pub qrels: HashMap<String, HashMap<String, u32>>,
    bm25: Bm25,
}

#[derive(serde::Deserialize)]
struct Row {
    #[serde(rename = "_id")]
    id: String,
    text: String,
    #[serde(default)]
    title: String,
}

fn read_jsonl(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| GratingError::InvalidInput(format!("{}: {e}", path.display())))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| GratingError::InvalidInput(format!("{}:{}: {e}", path.display(), i + 1)))
        })
        .collect()
}

impl Dl19 {
    pub fn load(dir: &Path) -> Result<Dl19> {
        let corpus = read_jsonl(&dir.join("corpus.jsonl"))?;
        let queries = read_jsonl(&dir.join("queries.jsonl"))?;
        let qrels_text = std::fs::read_to_string(dir.join("qrels.tsv"))
            .map_err(|e| GratingError::InvalidInput(format!("{}: {e}", dir.join("qrels.tsv").display())))?;
        let mut qrels: HashMap<String, HashMap<String, u32>> = HashMap::new();
        for line in qrels_text.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() != 3 {
                return Err(GratingError::InvalidInput(format!("qrels line {line:?}: expected 3 fields")));
            }
            let grade: u32 = f[2].trim().parse().map_err(|_| GratingError::InvalidInput(format!("qrels line {line:?}: bad grade")))?;
            qrels.entry(f[0].to_string()).or_default().insert(f[1].to_string(), grade);
        }
        let doc_texts: Vec<String> = corpus
            .iter()
            .map(|r| if r.title.is_empty() { r.text.clone() } else { format!("{} {}", r.title, r.text) })
            .collect();
        let bm25 = Bm25::new(doc_texts.iter().map(String::as_str));
        Ok(Dl19 {
            doc_ids: corpus.into_iter().map(|r| r.id).collect(),
            doc_texts,
            queries: queries
                .into_iter()
                .filter(|q| qrels.contains_key(&q.id))
                .map(|q| (q.id, q.text))
                .collect(),
            qrels,
            bm25,
        })
    }

    /// BM25 top-`n` document indices for a query.
    pub fn candidates(&self, query: &str, n: usize) -> Vec<usize> {
        self.bm25.top(query, n).into_iter().map(|(d, _)| d).collect()
    }
}

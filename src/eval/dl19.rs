//! A judged retrieval collection: the TREC DL 2019 passage subset in ../shared/data (jsonl
//! corpus and queries, `qrels.tsv`), or any collection in BEIR's layout (the same jsonl files,
//! judgments in `qrels/test.tsv` with a header line).

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
    let text = std::fs::read_to_string(path)
        .map_err(|e| GratingError::InvalidInput(format!("{}: {e}", path.display())))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                GratingError::InvalidInput(format!("{}:{}: {e}", path.display(), i + 1))
            })
        })
        .collect()
}

impl Dl19 {
    pub fn load(dir: &Path) -> Result<Dl19> {
        let corpus = read_jsonl(&dir.join("corpus.jsonl"))?;
        let queries = read_jsonl(&dir.join("queries.jsonl"))?;
        // TREC DL's `qrels.tsv`, else BEIR's `qrels/test.tsv` (then `dev`, then `train`).
        let qrels_path = [
            "qrels.tsv",
            "qrels/test.tsv",
            "qrels/dev.tsv",
            "qrels/train.tsv",
        ]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .unwrap_or_else(|| dir.join("qrels.tsv"));
        let qrels_text = std::fs::read_to_string(&qrels_path).map_err(|e| {
            GratingError::InvalidInput(format!(
                "{}: {e} (judgments go in qrels.tsv or BEIR's qrels/test.tsv)",
                qrels_path.display()
            ))
        })?;
        let mut qrels: HashMap<String, HashMap<String, u32>> = HashMap::new();
        for (n, line) in qrels_text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() != 3 {
                return Err(GratingError::InvalidInput(format!(
                    "qrels line {line:?}: expected 3 fields"
                )));
            }
            // BEIR's header line.
            if n == 0 && f[2].trim().parse::<u32>().is_err() && f[0].contains("id") {
                continue;
            }
            let grade: u32 = f[2].trim().parse().map_err(|_| {
                GratingError::InvalidInput(format!("qrels line {line:?}: bad grade"))
            })?;
            qrels
                .entry(f[0].to_string())
                .or_default()
                .insert(f[1].to_string(), grade);
        }
        let doc_texts: Vec<String> = corpus
            .iter()
            .map(|r| {
                if r.title.is_empty() {
                    r.text.clone()
                } else {
                    format!("{} {}", r.title, r.text)
                }
            })
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
        self.bm25
            .top(query, n)
            .into_iter()
            .map(|(d, _)| d)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn collection(qrels_file: &str, qrels: &str) -> Result<Dl19> {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "corpus.jsonl",
            "{\"_id\": \"d1\", \"title\": \"T\", \"text\": \"water boils\"}\n{\"_id\": \"d2\", \"text\": \"paris\"}\n",
        );
        write(
            dir.path(),
            "queries.jsonl",
            "{\"_id\": \"q1\", \"text\": \"boiling water\"}\n{\"_id\": \"q2\", \"text\": \"unjudged\"}\n",
        );
        write(dir.path(), qrels_file, qrels);
        Dl19::load(dir.path())
    }

    #[test]
    fn trec_and_beir_layouts_load_alike() {
        for (file, qrels) in [
            ("qrels.tsv", "q1\td1\t2\nq1\td2\t0\n"),
            (
                "qrels/test.tsv",
                "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\n",
            ),
        ] {
            let c = collection(file, qrels).unwrap();
            assert_eq!(
                c.queries,
                vec![("q1".to_string(), "boiling water".to_string())]
            );
            assert_eq!(c.qrels["q1"]["d1"], 2);
            assert_eq!(c.qrels["q1"]["d2"], 0);
            assert_eq!(c.doc_texts[0], "T water boils");
            assert_eq!(c.candidates("boiling water", 5), vec![0]);
        }
        // A header anywhere but the first line, or a bad grade, is an error.
        assert!(collection("qrels.tsv", "q1\td1\t2\nquery-id\tcorpus-id\tscore\n").is_err());
        assert!(collection("qrels.tsv", "q1\td1\tx\n").is_err());
        let e = collection("elsewhere.tsv", "q1\td1\t2\n").err().unwrap();
        assert!(e.to_string().contains("qrels/test.tsv"), "{e}");
    }
}

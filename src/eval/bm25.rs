//! Okapi BM25 over an in-memory corpus, to produce first-stage candidates the way a retrieval
//! pipeline would (k1 = 0.9, b = 0.4, lower-cased alphanumeric tokens, Lucene's idf).

use std::collections::HashMap;

pub struct Bm25 {
    k1: f64,
    b: f64,
    avg_len: f64,
    doc_lens: Vec<u32>,
    /// term -> (doc, term frequency) postings.
    postings: HashMap<String, Vec<(u32, u32)>>,
}

/// Lower-cased runs of alphanumeric characters (and `_`), like `\w+`.
pub fn tokens(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|t| !t.is_empty())
        .map(|t| t.to_lowercase())
}

impl Bm25 {
    pub fn new<'a>(docs: impl IntoIterator<Item = &'a str>) -> Bm25 {
        Self::with_params(docs, 0.9, 0.4)
    }

    pub fn with_params<'a>(docs: impl IntoIterator<Item = &'a str>, k1: f64, b: f64) -> Bm25 {
        let mut postings: HashMap<String, Vec<(u32, u32)>> = HashMap::new();
        let mut doc_lens = Vec::new();
        for (d, text) in docs.into_iter().enumerate() {
            let mut tf: HashMap<String, u32> = HashMap::new();
            let mut len = 0;
            for t in tokens(text) {
                *tf.entry(t).or_default() += 1;
                len += 1;
            }
            doc_lens.push(len);
            for (t, c) in tf {
                postings.entry(t).or_default().push((d as u32, c));
            }
        }
        let avg_len = doc_lens.iter().map(|&l| l as f64).sum::<f64>() / doc_lens.len().max(1) as f64;
        Bm25 {
            k1,
            b,
            avg_len,
            doc_lens,
            postings,
        }
    }

    fn idf(&self, df: usize) -> f64 {
        let n = self.doc_lens.len() as f64;
        (1.0 + (n - df as f64 + 0.5) / (df as f64 + 0.5)).ln()
    }

    /// The `n` best documents for `query` as (doc index, score), best first; ties by index.
    pub fn top(&self, query: &str, n: usize) -> Vec<(usize, f64)> {
        let mut scores: HashMap<u32, f64> = HashMap::new();
        for t in tokens(query) {
            let Some(post) = self.postings.get(&t) else { continue };
            let idf = self.idf(post.len());
            for &(d, tf) in post {
                let tf = tf as f64;
                let norm = self.k1 * (1.0 - self.b + self.b * self.doc_lens[d as usize] as f64 / self.avg_len);
                *scores.entry(d).or_default() += idf * tf * (self.k1 + 1.0) / (tf + norm);
            }
        }
        let mut v: Vec<(usize, f64)> = scores.into_iter().map(|(d, s)| (d as usize, s)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_matching_documents_first() {
        let docs = ["the cat sat on the mat", "dogs bark loudly", "a cat and a dog", "nothing here"];
        let bm = Bm25::new(docs.iter().copied());
        let top = bm.top("cat mat", 3);
        assert_eq!(top[0].0, 0);
        assert_eq!(top[1].0, 2);
        assert_eq!(top.len(), 2, "documents without query terms are not candidates");
    }

    #[test]
    fn idf_prefers_rare_terms() {
        let docs = ["common rare", "common", "common", "common"];
        let bm = Bm25::new(docs.iter().copied());
        assert!(bm.idf(1) > bm.idf(4));
        assert_eq!(bm.top("rare", 5), vec![(0, bm.top("rare", 1)[0].1)]);
    }
}

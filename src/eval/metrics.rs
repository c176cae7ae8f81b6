//! Ranking metrics with graded judgments (trec_eval conventions: linear gains).

use std::collections::HashMap;

/// nDCG@k with linear gains `grade / log2(rank + 1)`, the ideal ranking taken over all judged
/// documents of the query (trec_eval's `ndcg_cut`).
pub fn ndcg_at(ranked: &[&str], qrels: &HashMap<String, u32>, k: usize) -> f64 {
    let dcg: f64 = ranked
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, d)| qrels.get(*d).copied().unwrap_or(0) as f64 / ((i + 2) as f64).log2())
        .sum();
    let mut ideal: Vec<u32> = qrels.values().copied().filter(|&g| g > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, &g)| g as f64 / ((i + 2) as f64).log2())
        .sum();
    if idcg == 0.0 {
        0.0
    } else {
        dcg / idcg
    }
}

/// Precision@k: judged-relevant (grade >= 1) documents among the first k, over k.
pub fn precision_at(ranked: &[&str], qrels: &HashMap<String, u32>, k: usize) -> f64 {
    let hits = ranked
        .iter()
        .take(k)
        .filter(|d| qrels.get(**d).copied().unwrap_or(0) >= 1)
        .count();
    hits as f64 / k as f64
}

/// Share of `reference`'s first k items that `candidate`'s first k also contain.
pub fn topk_agreement<T: PartialEq>(candidate: &[T], reference: &[T], k: usize) -> f64 {
    let r = &reference[..k.min(reference.len())];
    if r.is_empty() {
        return 1.0;
    }
    let c = &candidate[..k.min(candidate.len())];
    r.iter().filter(|x| c.contains(x)).count() as f64 / r.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndcg_of_ideal_ranking_is_one() {
        let q: HashMap<String, u32> = [("a", 3), ("b", 1), ("c", 2)]
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        assert!((ndcg_at(&["a", "c", "b"], &q, 10) - 1.0).abs() < 1e-12);
        let worse = ndcg_at(&["b", "c", "a"], &q, 10);
        assert!(worse < 1.0 && worse > 0.0);
        // Hand computation: (1/1 + 2/log2(3) + 3/2) / (3/1 + 2/log2(3) + 1/2).
        let want = (1.0 + 2.0 / 3f64.log2() + 1.5) / (3.0 + 2.0 / 3f64.log2() + 0.5);
        assert!((worse - want).abs() < 1e-12);
    }

    #[test]
    fn precision_and_agreement() {
        let q: HashMap<String, u32> = [("a", 1)].iter().map(|(k, v)| (k.to_string(), *v)).collect();
        assert_eq!(precision_at(&["x", "a"], &q, 2), 0.5);
        assert_eq!(topk_agreement(&[1, 2, 3], &[3, 2, 9], 2), 0.5);
        assert_eq!(topk_agreement(&[1, 2], &[2, 1], 2), 1.0);
    }
}

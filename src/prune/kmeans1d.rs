//! Optimal 1-D k-means: on sorted values every optimal cluster is a contiguous run, so a
//! dynamic program over split points finds the exact minimum of the within-cluster sum of
//! squares. Split points are monotone in the row index (the cost obeys the quadrangle
//! inequality), which divide-and-conquer exploits for O(k n log n).

/// Prefix sums giving the SSE of any contiguous run in O(1).
struct RunCost {
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
}

impl RunCost {
    fn new(sorted: &[f64]) -> RunCost {
        let mut sum = Vec::with_capacity(sorted.len() + 1);
        let mut sum_sq = Vec::with_capacity(sorted.len() + 1);
        sum.push(0.0);
        sum_sq.push(0.0);
        for v in sorted {
            sum.push(sum.last().unwrap() + v);
            sum_sq.push(sum_sq.last().unwrap() + v * v);
        }
        RunCost { sum, sum_sq }
    }

    /// SSE of values `[i, j)`.
    fn cost(&self, i: usize, j: usize) -> f64 {
        if j <= i {
            return 0.0;
        }
        let n = (j - i) as f64;
        let s = self.sum[j] - self.sum[i];
        let sq = self.sum_sq[j] - self.sum_sq[i];
        (sq - s * s / n).max(0.0)
    }
}

/// The optimal clustering into exactly `k` runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    /// Start index of each cluster in the sorted input (the first is 0).
    pub starts: Vec<usize>,
    pub sse: f64,
}

impl Clustering {
    /// Cluster index of sorted position `i`.
    pub fn cluster_of(&self, i: usize) -> usize {
        self.starts.partition_point(|&s| s <= i) - 1
    }

    /// `[start, end)` of cluster `c` among `n` sorted values.
    pub fn range(&self, c: usize, n: usize) -> (usize, usize) {
        let end = self.starts.get(c + 1).copied().unwrap_or(n);
        (self.starts[c], end)
    }
}

/// Optimal clusterings of `sorted` (ascending or descending) for every k in `1..=max_k`
/// (fewer if there are fewer values). Entry `k-1` is the clustering into k runs.
pub fn optimal_all(sorted: &[f64], max_k: usize) -> Vec<Clustering> {
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let max_k = max_k.min(n).max(1);
    let cost = RunCost::new(sorted);
    // dp[j] = best SSE of the first j values in the current number of clusters.
    let mut dp: Vec<f64> = (0..=n).map(|j| cost.cost(0, j)).collect();
    let mut splits: Vec<Vec<usize>> = vec![vec![0; n + 1]];
    let mut out = vec![Clustering {
        starts: vec![0],
        sse: dp[n],
    }];
    for k in 2..=max_k {
        let mut next = vec![f64::INFINITY; n + 1];
        let mut arg = vec![0usize; n + 1];
        solve_layer(&cost, &dp, &mut next, &mut arg, k, n, k - 1, n - 1);
        splits.push(arg);
        dp = next;
        // Walk split points back from the end.
        let mut starts = Vec::with_capacity(k);
        let mut j = n;
        for level in (1..k).rev() {
            let s = splits[level][j];
            starts.push(s);
            j = s;
        }
        starts.push(0);
        starts.reverse();
        out.push(Clustering { starts, sse: dp[n] });
    }
    out
}

/// Fills `next[j]` for j in [lo, hi] with min over s of `prev[s] + cost(s, j)`, the optimal
/// `s` lying in [opt_lo, opt_hi] (divide and conquer on monotone split points).
#[allow(clippy::too_many_arguments)]
fn solve_layer(
    cost: &RunCost,
    prev: &[f64],
    next: &mut [f64],
    arg: &mut [usize],
    k: usize,
    hi_j: usize,
    opt_lo: usize,
    opt_hi: usize,
) {
    // Iterative stack of (lo, hi, opt_lo, opt_hi) ranges to avoid deep recursion.
    let mut stack = vec![(k, hi_j, opt_lo, opt_hi)];
    while let Some((lo, hi, olo, ohi)) = stack.pop() {
        if lo > hi {
            continue;
        }
        let mid = (lo + hi) / 2;
        let mut best = f64::INFINITY;
        let mut best_s = olo;
        // The last cluster [s, mid) needs at least one value, and the first s values need k-1.
        let s_hi = ohi.min(mid - 1);
        for s in olo.max(k - 1)..=s_hi {
            let c = prev[s] + cost.cost(s, mid);
            if c < best {
                best = c;
                best_s = s;
            }
        }
        next[mid] = best;
        arg[mid] = best_s;
        if mid > lo {
            stack.push((lo, mid - 1, olo, best_s));
        }
        stack.push((mid + 1, hi, best_s, ohi));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every way of cutting `n` sorted values into `k` contiguous runs.
    fn brute_force(sorted: &[f64], k: usize) -> f64 {
        fn rec(cost: &RunCost, start: usize, n: usize, k: usize) -> f64 {
            if k == 1 {
                return cost.cost(start, n);
            }
            (start + 1..=n - (k - 1))
                .map(|s| cost.cost(start, s) + rec(cost, s, n, k - 1))
                .fold(f64::INFINITY, f64::min)
        }
        rec(&RunCost::new(sorted), 0, sorted.len(), k)
    }

    #[test]
    fn matches_brute_force_on_random_inputs() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for trial in 0..300 {
            let n = rng.random_range(1..=11);
            let mut v: Vec<f64> = (0..n)
                .map(|_| {
                    if trial % 3 == 0 {
                        rng.random_range(0..4) as f64 // many ties
                    } else {
                        rng.random_range(-5.0..5.0)
                    }
                })
                .collect();
            v.sort_by(|a, b| a.total_cmp(b));
            let all = optimal_all(&v, 6);
            assert_eq!(all.len(), n.min(6));
            for (ki, c) in all.iter().enumerate() {
                let k = ki + 1;
                let want = brute_force(&v, k);
                assert!((c.sse - want).abs() < 1e-9, "n={n} k={k}: {} vs {want}", c.sse);
                assert_eq!(c.starts.len(), k);
                assert_eq!(c.starts[0], 0);
                assert!(c.starts.windows(2).all(|w| w[0] < w[1]), "{:?}", c.starts);
                let recomputed: f64 = (0..k)
                    .map(|ci| {
                        let (s, e) = c.range(ci, n);
                        RunCost::new(&v).cost(s, e)
                    })
                    .sum();
                assert!((recomputed - c.sse).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn separates_obvious_groups() {
        let v = [9.0, 8.9, 8.8, 5.1, 5.0, 1.0, 0.9, 0.8, 0.7];
        let c = &optimal_all(&v, 3)[2];
        assert_eq!(c.starts, vec![0, 3, 5]);
        assert_eq!(c.cluster_of(4), 1);
        assert_eq!(c.cluster_of(8), 2);
    }

    #[test]
    fn large_input_is_fast_and_consistent() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut v: Vec<f64> = (0..5000).map(|_| rng.random_range(-3.0..3.0)).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        let all = optimal_all(&v, 8);
        assert!(all.windows(2).all(|w| w[1].sse <= w[0].sse + 1e-9));
    }
}

//! What a score means. A cross-encoder's head is trained to rank, not to give probabilities:
//! the shared MiniLM scores 0.91 or more after the sigmoid for every DL19 passage, relevant or
//! not, so no client-side threshold works on it. A per-model calibration fitted on judged data
//! (Platt scaling, `sigmoid(scale * logit + bias)`) maps logits to the probability that a
//! document is relevant. It changes no ranking: it is monotone in the logit.
//!
//! Fitted by `grating calibrate --scores` and saved beside the model's pruning profile, keyed
//! by the same fingerprint; without one, scores are the plain sigmoid.

use crate::engine::sigmoid;
use crate::error::{GratingError, Result};
use crate::prune::profile;
use crate::weights::ModelFiles;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Platt scaling of a model's logits, with what it was fitted on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScoreCalibration {
    pub model: String,
    pub fingerprint: String,
    /// Always `platt`.
    pub method: String,
    pub scale: f64,
    pub bias: f64,
    /// Judgments of at least this grade count as relevant.
    pub relevant_grade: u32,
    /// Pairs (judged ones and random passages), relevant pairs and queries it was fitted on,
    /// and where they came from.
    pub pairs: usize,
    pub positives: usize,
    pub queries: usize,
    pub data: String,
    /// Held-out quality, measured on queries left out of the fit (k folds by query).
    pub held_out: Option<HeldOut>,
}

/// Log loss and Brier score of the plain sigmoid and of the calibration on held-out queries,
/// and the shares of pairs each puts on the right side of 0.5.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeldOut {
    pub folds: usize,
    pub log_loss_sigmoid: f64,
    pub log_loss_calibrated: f64,
    pub brier_sigmoid: f64,
    pub brier_calibrated: f64,
    /// Relevant pairs scored above 0.5.
    pub relevant_above_half: f64,
    /// Judged non-relevant pairs scored below 0.5.
    pub judged_below_half: f64,
    /// Random passages scored below 0.5.
    pub random_below_half: f64,
    pub sigmoid_relevant_above_half: f64,
    pub sigmoid_judged_below_half: f64,
    pub sigmoid_random_below_half: f64,
}

impl ScoreCalibration {
    /// The calibrated probability of relevance of `logit` (increasing in it: `scale` > 0 is
    /// checked when a calibration is loaded).
    pub fn apply(&self, logit: f32) -> f32 {
        platt(self.scale, self.bias, logit) as f32
    }
}

/// `sigmoid(scale * logit + bias)`.
pub fn platt(scale: f64, bias: f64, logit: f32) -> f64 {
    1.0 / (1.0 + (-(scale * logit as f64 + bias)).exp())
}

/// Fits `sigmoid(scale * x + bias)` to binary labels by Newton's method on the log loss, with
/// Platt's smoothed targets ((positives + 1) / (positives + 2) and 1 / (negatives + 2)) so that
/// separable data does not send the scale to infinity. Returns `(scale, bias)`.
pub fn fit_platt(logits: &[f32], relevant: &[bool]) -> Result<(f64, f64)> {
    let positives = relevant.iter().filter(|&&r| r).count();
    let negatives = relevant.len() - positives;
    if logits.len() != relevant.len() || positives == 0 || negatives == 0 {
        return Err(GratingError::InvalidInput(format!(
            "score calibration needs relevant and non-relevant judged pairs (got {positives} and {negatives})"
        )));
    }
    if logits.iter().any(|l| !l.is_finite()) {
        return Err(GratingError::InvalidInput(
            "score calibration got a non-finite logit".into(),
        ));
    }
    let hi = (positives as f64 + 1.0) / (positives as f64 + 2.0);
    let lo = 1.0 / (negatives as f64 + 2.0);
    let targets: Vec<f64> = relevant.iter().map(|&r| if r { hi } else { lo }).collect();
    let xs: Vec<f64> = logits.iter().map(|&l| l as f64).collect();
    let loss = |a: f64, b: f64| -> f64 {
        xs.iter()
            .zip(&targets)
            .map(|(&x, &t)| {
                let z = a * x + b;
                // log(1 + e^z) - t z, computed without overflow.
                let softplus = if z > 0.0 {
                    z + (-z).exp().ln_1p()
                } else {
                    z.exp().ln_1p()
                };
                softplus - t * z
            })
            .sum()
    };
    let (mut a, mut b) = (1.0f64, 0.0f64);
    let mut current = loss(a, b);
    for _ in 0..200 {
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (&x, &t) in xs.iter().zip(&targets) {
            let p = 1.0 / (1.0 + (-(a * x + b)).exp());
            let d = p - t;
            let w = (p * (1.0 - p)).max(1e-12);
            ga += d * x;
            gb += d;
            haa += w * x * x;
            hab += w * x;
            hbb += w;
        }
        // A small ridge keeps the Hessian invertible when every logit is the same.
        let (haa, hbb) = (haa + 1e-9, hbb + 1e-9);
        let det = haa * hbb - hab * hab;
        let (da, db) = ((hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det);
        let mut step = 1.0;
        let mut improved = false;
        while step > 1e-10 {
            let (na, nb) = (a - step * da, b - step * db);
            let l = loss(na, nb);
            if l.is_finite() && l <= current {
                improved = current - l > 1e-12 * current.abs().max(1.0);
                (a, b, current) = (na, nb, l);
                break;
            }
            step /= 2.0;
        }
        if !improved {
            break;
        }
    }
    Ok((a, b))
}

/// Mean log loss and Brier score of probabilities against binary labels.
pub fn log_loss_and_brier(probs: &[f64], relevant: &[bool]) -> (f64, f64) {
    let n = probs.len().max(1) as f64;
    let (mut ll, mut brier) = (0.0, 0.0);
    for (&p, &r) in probs.iter().zip(relevant) {
        let p = p.clamp(1e-7, 1.0 - 1e-7);
        let y = if r { 1.0 } else { 0.0 };
        ll -= y * p.ln() + (1.0 - y) * (1.0 - p).ln();
        brier += (p - y) * (p - y);
    }
    (ll / n, brier / n)
}

/// The plain sigmoid as a probability, for comparison.
pub fn sigmoid_probability(logit: f32) -> f64 {
    sigmoid(logit) as f64
}

/// The calibration file of this model in `dir`.
pub fn calibration_path(dir: &Path, files: &ModelFiles) -> Result<PathBuf> {
    Ok(dir.join(format!("{}.scores.json", profile::fingerprint(files)?)))
}

/// The saved calibration of this model in `dir`, if any.
pub fn load(dir: &Path, files: &ModelFiles) -> Result<Option<ScoreCalibration>> {
    let path = calibration_path(dir, files)?;
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)?;
    let c: ScoreCalibration =
        serde_json::from_str(&text).map_err(|e| GratingError::ModelFiles {
            path: path.clone(),
            reason: format!("invalid score calibration: {e}"),
        })?;
    // A calibration must rise with the logit, or scores would contradict the ranking.
    if !(c.scale.is_finite() && c.scale > 0.0 && c.bias.is_finite()) {
        return Err(GratingError::ModelFiles {
            path,
            reason: format!(
                "score calibration needs a positive finite scale and a finite bias (got {} and {})",
                c.scale, c.bias
            ),
        });
    }
    Ok(Some(c))
}

pub fn save(dir: &Path, files: &ModelFiles, c: &ScoreCalibration) -> Result<PathBuf> {
    let path = calibration_path(dir, files)?;
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(c).expect("calibration serialises");
    std::fs::write(&path, text)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labels drawn from a known Platt curve: the fit recovers its parameters.
    #[test]
    fn the_fit_recovers_a_known_curve() {
        let (scale, bias) = (0.8f64, -6.0f64);
        let mut logits = Vec::new();
        let mut relevant = Vec::new();
        // Deterministic "sampling": at each logit, a share of positives equal to the curve's
        // probability, over 200 copies.
        for i in 0..=60 {
            let x = i as f32 * 0.25;
            let p = platt(scale, bias, x);
            let pos = (p * 200.0).round() as usize;
            for j in 0..200 {
                logits.push(x);
                relevant.push(j < pos);
            }
        }
        let (a, b) = fit_platt(&logits, &relevant).unwrap();
        assert!(
            (a - scale).abs() < 0.02 && (b - bias).abs() < 0.15,
            "{a} {b}"
        );
    }

    #[test]
    fn separable_data_gets_a_finite_curve_and_bad_data_an_error() {
        let logits = [1.0, 2.0, 3.0, 10.0, 11.0, 12.0];
        let relevant = [false, false, false, true, true, true];
        let (a, b) = fit_platt(&logits, &relevant).unwrap();
        assert!(a.is_finite() && b.is_finite() && a > 0.0);
        let c = ScoreCalibration {
            model: "m".into(),
            fingerprint: "f".into(),
            method: "platt".into(),
            scale: a,
            bias: b,
            relevant_grade: 2,
            pairs: 6,
            positives: 3,
            queries: 1,
            data: "test".into(),
            held_out: None,
        };
        assert!(c.apply(2.0) < 0.5 && c.apply(11.0) > 0.5);
        assert!(c.apply(3.0) < c.apply(10.0));
        assert!(fit_platt(&[1.0, 2.0], &[true, true]).is_err());
        assert!(fit_platt(&[f32::NAN, 2.0], &[true, false]).is_err());
    }

    #[test]
    fn losses_prefer_the_truth() {
        let (ll_good, b_good) = log_loss_and_brier(&[0.9, 0.1], &[true, false]);
        let (ll_bad, b_bad) = log_loss_and_brier(&[0.5, 0.5], &[true, false]);
        assert!(ll_good < ll_bad && b_good < b_bad);
    }
}

//! Residual add + normalisation: LayerNorm for post-norm encoders, RMSNorm for pre-norm
//! decoders, each fused with the residual add so the sum is read once.

use super::{cpu, cpu_tensor, cpu_view, CResult};
#[cfg(feature = "cuda")]
use super::{cuda, fused_gpu, gpu_path_enabled, GpuPath};
use candle_core::Tensor;

/// `LayerNorm(x + residual)` over the last dimension (post-norm encoders).
pub fn add_layer_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    gamma: &Tensor,
    beta: Option<&Tensor>,
    eps: f64,
) -> CResult<Tensor> {
    let (rows, d) = x.dims2()?;
    let views = (
        cpu_view(x),
        residual.map(cpu_view),
        cpu_view(gamma),
        beta.map(cpu_view),
    );
    if let (Some(xv), r, Some(gv), bt) = views {
        let r_ok = !matches!(r, Some(None));
        let b_ok = !matches!(bt, Some(None));
        if r_ok && b_ok {
            let mut out = vec![0f32; rows * d];
            cpu::add_layer_norm(
                xv.slice(),
                r.as_ref().and_then(|v| v.as_ref().map(|v| v.slice())),
                gv.slice(),
                bt.as_ref().and_then(|v| v.as_ref().map(|v| v.slice())),
                eps as f32,
                &mut out,
            );
            return cpu_tensor(out, (rows, d));
        }
    }
    let sum = match residual {
        Some(r) => (x + r)?,
        None => x.clone(),
    };
    let beta = match beta {
        Some(b) => b.clone(),
        None => gamma.zeros_like()?,
    };
    candle_nn::ops::layer_norm(&sum, gamma, &beta, eps as f32)
}

/// `(RMSNorm(x + residual), x + residual)` over the last dimension (pre-norm decoders). With no
/// residual the second value is `x` itself.
pub fn add_rms_norm(
    x: &Tensor,
    residual: Option<&Tensor>,
    gamma: &Tensor,
    eps: f64,
) -> CResult<(Tensor, Tensor)> {
    let (rows, d) = x.dims2()?;
    let rv = residual.map(cpu_view);
    if let (Some(xv), Some(gv)) = (cpu_view(x), cpu_view(gamma)) {
        match rv {
            None => {
                let mut out = vec![0f32; rows * d];
                cpu::add_rms_norm(xv.slice(), None, gv.slice(), eps as f32, None, &mut out);
                return Ok((cpu_tensor(out, (rows, d))?, x.clone()));
            }
            Some(Some(r)) => {
                let mut out = vec![0f32; rows * d];
                let mut sum = vec![0f32; rows * d];
                cpu::add_rms_norm(
                    xv.slice(),
                    Some(r.slice()),
                    gv.slice(),
                    eps as f32,
                    Some(&mut sum),
                    &mut out,
                );
                return Ok((cpu_tensor(out, (rows, d))?, cpu_tensor(sum, (rows, d))?));
            }
            Some(None) => {}
        }
    }
    #[cfg(feature = "cuda")]
    if fused_gpu(x)
        && residual.is_none_or(|r| fused_gpu(r) && r.dtype() == x.dtype() && r.dims() == x.dims())
        && gpu_path_enabled(GpuPath::Norm)
    {
        let gamma = gamma.to_dtype(x.dtype())?;
        let eps = eps as f32;
        let Some(r) = residual else {
            let normed = x.apply_op1_no_bwd(&cuda::RmsNorm { gamma: &gamma, eps })?;
            return Ok((normed, x.clone()));
        };
        // SAFETY: `sum` is fresh and the op below writes every element of it (one kernel
        // block per row storing x + residual at each column) before anything reads it; if
        // the op fails, `sum` is dropped unread.
        let sum = unsafe { Tensor::empty(x.shape(), x.dtype(), x.device())? };
        let op = cuda::AddRmsNorm::new(&gamma, eps);
        sum.inplace_op3(x, r, &op)?;
        let normed = op.take_normed(x.shape())?;
        return Ok((normed, sum));
    }
    let sum = match residual {
        Some(r) => (x + r)?,
        None => x.clone(),
    };
    let normed = candle_nn::ops::rms_norm(&sum, gamma, eps as f32)?;
    Ok((normed, sum))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{max_diff, rand_tensor};

    #[test]
    fn fast_paths_match_generic_candle_ops() {
        let x = rand_tensor(&[9, 16], 1);
        let r = rand_tensor(&[9, 16], 2);
        let g = rand_tensor(&[16], 3);
        let b = rand_tensor(&[16], 4);
        let ln = add_layer_norm(&x, Some(&r), &g, Some(&b), 1e-12).unwrap();
        let ln_ref = candle_nn::ops::layer_norm(&(&x + &r).unwrap(), &g, &b, 1e-12).unwrap();
        assert!(max_diff(&ln, &ln_ref) < 1e-5);
        let (rn, sum) = add_rms_norm(&x, Some(&r), &g, 1e-6).unwrap();
        let rn_ref = candle_nn::ops::rms_norm(&(&x + &r).unwrap(), &g, 1e-6).unwrap();
        assert!(max_diff(&rn, &rn_ref) < 1e-5);
        assert!(max_diff(&sum, &(&x + &r).unwrap()) < 1e-7);
    }
}

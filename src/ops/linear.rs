//! Linear layers and the activations that follow them: the CPU path runs BLAS and fuses the
//! activation into the output rows; CUDA half-precision GEMMs go to cuBLASLt; anything else
//! to candle's generic ops.

use super::{cpu, cpu_tensor, cpu_view, CResult};
#[cfg(feature = "cuda")]
use super::{cuda, fused_gpu, gpu_path_enabled, lt_operand, GpuPath};
use candle_core::{Device, Tensor};

/// The CPU fast path of a linear layer: the output rows as a plain vector, or `None` when
/// an operand is not a contiguous f32 CPU tensor (the caller then uses candle's ops).
pub(super) fn linear_cpu(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
) -> CResult<Option<(Vec<f32>, usize, usize)>> {
    let (rows, in_dim) = x.dims2()?;
    let (out_dim, w_in) = w.dims2()?;
    if in_dim != w_in {
        candle_core::bail!("linear: input width {in_dim} does not match weight {out_dim}x{w_in}");
    }
    let (Some(xv), Some(wv)) = (cpu_view(x), cpu_view(w)) else {
        return Ok(None);
    };
    let bv = match b.map(cpu_view) {
        Some(None) => return Ok(None),
        Some(Some(v)) => Some(v),
        None => None,
    };
    let mut out = vec![0f32; rows * out_dim];
    cpu::linear(
        xv.slice(),
        rows,
        in_dim,
        wv.slice(),
        out_dim,
        bv.as_ref().map(|v| v.slice()),
        &mut out,
    );
    Ok(Some((out, rows, out_dim)))
}

/// `x [rows, in] · w[out, in]^T + b` (a torch `nn.Linear`).
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    match linear_cpu(x, w, b)? {
        Some((out, rows, cols)) => cpu_tensor(out, (rows, cols)),
        None => linear_device(x, w, b),
    }
}

/// A linear layer off the CPU fast path: cuBLASLt for half-precision CUDA tensors, candle's
/// matmul otherwise.
fn linear_device(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let same = |t: &Tensor| t.dtype() == x.dtype() && lt_operand(t);
        if same(x) && same(w) && b.is_none_or(same) && gpu_path_enabled(GpuPath::Gemm) {
            return match b {
                Some(b) => x.apply_op3_no_bwd(w, b, &cuda::LtLinear),
                None => x.apply_op2_no_bwd(w, &cuda::LtLinear),
            };
        }
    }
    linear_generic(x, w, b)
}

/// `gelu(linear(x, w, b))`, fused on the CPU so the wide intermediate exists once.
pub fn linear_gelu(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    match linear_cpu(x, w, b)? {
        Some((mut out, rows, cols)) => {
            cpu::gelu_erf(&mut out);
            cpu_tensor(out, (rows, cols))
        }
        None => {
            let y = linear_device(x, w, b)?;
            #[cfg(feature = "cuda")]
            if fused_gpu(&y) {
                // In place: the intermediate activation exists once.
                y.inplace_op1(&cuda::GeluErf)?;
                return Ok(y);
            }
            gelu(y)
        }
    }
}

fn linear_generic(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    let y = x.matmul(&w.t()?)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Exact (erf) GELU.
pub fn gelu(x: Tensor) -> CResult<Tensor> {
    let dims = x.dims().to_vec();
    if let Some(v) = cpu_view(&x) {
        let mut data = v.slice().to_vec();
        drop(v);
        cpu::gelu_erf(&mut data);
        return Tensor::from_vec(data, dims, &Device::Cpu);
    }
    x.gelu_erf()
}

/// SwiGLU on a fused `[gate | up]` projection of width `2 * inter`.
pub fn silu_mul(gate_up: &Tensor, inter: usize) -> CResult<Tensor> {
    let (rows, w) = gate_up.dims2()?;
    if w != 2 * inter {
        candle_core::bail!("silu_mul: width {w} is not 2 x {inter}");
    }
    if let Some(v) = cpu_view(gate_up) {
        let mut out = vec![0f32; rows * inter];
        cpu::silu_mul(v.slice(), inter, &mut out);
        return cpu_tensor(out, (rows, inter));
    }
    #[cfg(feature = "cuda")]
    if fused_gpu(gate_up) {
        return gate_up.apply_op1_no_bwd(&cuda::SiluMul { inter });
    }
    let gate = gate_up.narrow(1, 0, inter)?;
    let up = gate_up.narrow(1, inter, inter)?;
    candle_nn::ops::silu(&gate)? * up
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{max_diff, rand_tensor};

    #[test]
    fn fast_paths_match_generic_candle_ops() {
        let x = rand_tensor(&[9, 16], 1);
        let w = rand_tensor(&[24, 16], 5);
        let wb = rand_tensor(&[24], 6);
        assert!(
            max_diff(
                &linear(&x, &w, Some(&wb)).unwrap(),
                &linear_generic(&x, &w, Some(&wb)).unwrap()
            ) < 1e-5
        );
        assert!(max_diff(&gelu(x.clone()).unwrap(), &x.gelu_erf().unwrap()) < 1e-6);
        let gu = rand_tensor(&[9, 32], 7);
        let sm = silu_mul(&gu, 16).unwrap();
        let sm_ref = (candle_nn::ops::silu(&gu.narrow(1, 0, 16).unwrap()).unwrap()
            * gu.narrow(1, 16, 16).unwrap())
        .unwrap();
        assert!(max_diff(&sm, &sm_ref) < 1e-5);
    }
}

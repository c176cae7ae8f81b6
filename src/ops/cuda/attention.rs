//! Attention kernels: the glue of length-bucketed attention (pack, masked softmax, unpack)
//! and the tensor-core flash kernel.

use super::{check_u32, linear_launch, no_cpu, view, Operand};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, InplaceOp1, InplaceOp2, Layout, Result, Shape,
    Tensor,
};

/// One length bucket's geometry: `starts`/`lens` are u32 device tensors of `b` sequences,
/// each `start + len` at most the packed row count and each `len` at most `lmax` (the kernels
/// index with them unchecked; `ops::attention` builds them from a packed layout).
#[derive(Clone)]
pub struct Bucket {
    pub starts: Tensor,
    pub lens: Tensor,
    pub b: usize,
    pub lmax: usize,
}

impl Bucket {
    /// The host-side checks of what the kernels read: one start and length per sequence.
    fn check(&self, what: &str) -> Result<()> {
        if self.starts.elem_count() != self.b || self.lens.elem_count() != self.b {
            bail!("{what}: bucket tables do not hold {} sequences", self.b);
        }
        Ok(())
    }
}

/// Grouped-query heads: each kv head serves the same number of query heads.
fn check_heads(what: &str, n_heads: usize, n_kv_heads: usize) -> Result<()> {
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        bail!("{what}: {n_heads} query heads do not group over {n_kv_heads} kv heads");
    }
    Ok(())
}

/// Packs a bucket's q (scaled), k, v out of the fused projection into one flat tensor:
/// q `[b, nkv, rep, lmax, dh]`, then k and v `[b, nkv, lmax, dh]`.
pub struct AttnPack<'a> {
    pub bucket: &'a Bucket,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl CustomOp1 for AttnPack<'_> {
    gpu_only_op1!("grating-attn-pack");
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &AttnPack<'_>,
            s: &CudaStorage,
            l: &Layout,
            total: usize,
        ) -> Result<CudaStorage> {
            let dev = s.device();
            let bk = op.bucket;
            let src = view::<T>(s, l)?;
            // SAFETY: uninitialised until the launch below, which writes all of it: the
            // grid-stride loop visits every idx < b * lmax * width = total and maps each to a
            // distinct element of the q, k or v block (a one-to-one re-layout, since nh is a
            // multiple of nkv: checked below), padding positions storing 0.
            let dst = unsafe { dev.alloc::<T>(total)? };
            let f = kernel!(dev, "attn_pack", s.dtype());
            let width = (op.n_heads + 2 * op.n_kv_heads) * op.head_dim;
            let (starts, lens) = (Operand::of(&bk.starts), Operand::of(&bk.lens));
            let (starts, lens) = (starts.view::<u32>()?, lens.view::<u32>()?);
            let mut b = f.builder();
            b.arg(&src);
            b.arg(&dst);
            b.arg(&starts);
            b.arg(&lens);
            candle_core::builder_arg!(
                b,
                bk.b as i32,
                bk.lmax as i32,
                op.n_heads as i32,
                op.n_kv_heads as i32,
                op.head_dim as i32,
                op.scale
            );
            // SAFETY: the arguments match kernels.cu's `attn_pack(const T *qkv, T *dst,
            // const uint32_t *starts, const uint32_t *lens, int b, int lmax, int nh, int nkv,
            // int dh, float scale)`; `dst` holds total elements, the tables b each (checked
            // below), qkv rows are `width` wide (checked below) and read only at `start + p`
            // with p < len, within the packed rows (the [`Bucket`] invariant); `total` fits the
            // kernel's 32-bit indices (`check_u32`).
            unsafe { b.launch(linear_launch(bk.b * bk.lmax * width)) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(dst, dev.clone()))
        }
        check_heads("attention pack", self.n_heads, self.n_kv_heads)?;
        self.bucket.check("attention pack")?;
        let width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim;
        if l.dims().len() != 2 || l.dims()[1] != width {
            bail!(
                "attention pack: qkv is {:?}, rows of {width} expected",
                l.dims()
            );
        }
        let total =
            (self.n_heads + 2 * self.n_kv_heads) * self.bucket.b * self.bucket.lmax * self.head_dim;
        check_u32("attention bucket", total)?;
        let out = dispatch!(s.dtype(), "attn_pack", run, self, s, l, total)?;
        Ok((out, Shape::from(total)))
    }
}

/// In-place masked softmax over a bucket's scores `[b * nkv, rep * lmax, lmax]`.
pub struct MaskedSoftmax<'a> {
    pub bucket: &'a Bucket,
    pub n_kv_heads: usize,
    pub rep: usize,
    pub causal: bool,
}

impl InplaceOp1 for MaskedSoftmax<'_> {
    fn name(&self) -> &'static str {
        "grating-masked-softmax"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
        bail!("masked softmax is a GPU kernel")
    }
    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &MaskedSoftmax<'_>,
            s: &mut CudaStorage,
            l: &Layout,
        ) -> Result<()> {
            let dev = s.device().clone();
            let dtype = s.dtype();
            let bk = op.bucket;
            let rows = bk.b * op.n_kv_heads * op.rep * bk.lmax;
            if l.shape().elem_count() != rows * bk.lmax || !l.is_contiguous() {
                bail!("masked softmax: scores do not match the bucket");
            }
            check_u32("masked softmax", rows.div_ceil(8))?;
            let f = kernel!(&dev, "masked_softmax", dtype);
            let offset = l.start_offset();
            let scores = s.as_cuda_slice_mut::<T>()?;
            let mut scores = scores.slice_mut(offset..offset + rows * bk.lmax);
            let lens = Operand::of(&bk.lens);
            let lens = lens.view::<u32>()?;
            let mut b = f.builder();
            b.arg(&mut scores);
            b.arg(&lens);
            candle_core::builder_arg!(
                b,
                rows as i64,
                op.n_kv_heads as i32,
                op.rep as i32,
                bk.lmax as i32,
                op.causal as i32
            );
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match kernels.cu's `masked_softmax(T *scores, const
            // uint32_t *lens, int64_t rows, int nkv, int rep, int lmax, int causal)`; `scores`
            // is this tensor's own rows * lmax elements (checked above), held mutably for the
            // op; one warp per row (8 per 256-thread block, grid covers rows) touches only its
            // row's lmax entries, and reads `lens[s]` for s < b (the table holds b: checked
            // below), each len at most lmax (the [`Bucket`] invariant).
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        }
        self.bucket.check("masked softmax")?;
        dispatch!(s.dtype(), "masked_softmax", run, self, s, l)
    }
}

/// Scatters a bucket's attention output `[b * nkv, rep * lmax, dh]` into the packed rows of
/// the `[rows, nh * dh]` tensor it is applied to.
pub struct AttnUnpack<'a> {
    pub bucket: &'a Bucket,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl InplaceOp2 for AttnUnpack<'_> {
    fn name(&self) -> &'static str {
        "grating-attn-unpack"
    }
    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("attention unpack is a GPU kernel")
    }
    fn cuda_fwd(
        &self,
        out: &mut CudaStorage,
        lo: &Layout,
        o: &CudaStorage,
        l: &Layout,
    ) -> Result<()> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &AttnUnpack<'_>,
            out: &mut CudaStorage,
            lo: &Layout,
            o: &CudaStorage,
            l: &Layout,
        ) -> Result<()> {
            let dev = out.device().clone();
            let dtype = out.dtype();
            let bk = op.bucket;
            let f = kernel!(&dev, "attn_unpack", dtype);
            let src = view::<T>(o, l)?;
            let Some((a, z)) = lo.contiguous_offsets() else {
                bail!("attention output must be contiguous")
            };
            let dst = out.as_cuda_slice_mut::<T>()?;
            let mut dst = dst.slice_mut(a..z);
            let (starts, lens) = (Operand::of(&bk.starts), Operand::of(&bk.lens));
            let (starts, lens) = (starts.view::<u32>()?, lens.view::<u32>()?);
            let mut b = f.builder();
            b.arg(&src);
            b.arg(&mut dst);
            b.arg(&starts);
            b.arg(&lens);
            candle_core::builder_arg!(
                b,
                bk.b as i32,
                bk.lmax as i32,
                op.n_heads as i32,
                op.n_kv_heads as i32,
                op.head_dim as i32
            );
            // SAFETY: the arguments match kernels.cu's `attn_unpack(const T *o, T *out, const
            // uint32_t *starts, const uint32_t *lens, int b, int lmax, int nh, int nkv, int dh)`;
            // `o` holds b * nh * lmax * dh elements and `out` is this tensor's own rows of
            // nh * dh, held mutably (both checked below); the kernel writes row `start + p`
            // only for p < len, within the packed rows (the [`Bucket`] invariant), and its
            // 32-bit indices stay below b * lmax * nh * dh (`check_u32`).
            unsafe { b.launch(linear_launch(bk.b * bk.lmax * op.n_heads * op.head_dim)) }.w()?;
            Ok(())
        }
        if out.dtype() != o.dtype() {
            bail!("attention unpack: dtype mismatch");
        }
        check_heads("attention unpack", self.n_heads, self.n_kv_heads)?;
        self.bucket.check("attention unpack")?;
        let per_bucket = self.bucket.b * self.bucket.lmax * self.n_heads * self.head_dim;
        check_u32("attention unpack", per_bucket)?;
        let width = self.n_heads * self.head_dim;
        if l.shape().elem_count() != per_bucket || lo.dims().len() != 2 || lo.dims()[1] != width {
            bail!(
                "attention unpack: output {:?} or bucket {:?} do not match",
                lo.dims(),
                l.dims()
            );
        }
        dispatch!(out.dtype(), "attn_unpack", run, self, out, lo, o, l)
    }
}

/// Head dimensions the flash attention kernel is instantiated for.
pub const FLASH_HEAD_DIMS: [usize; 3] = [32, 64, 128];
/// Query rows per flash attention block (the tile table's granularity).
pub const FLASH_QUERY_TILE: usize = 64;

/// Flash attention over the packed sequences of a fused qkv projection, into packed
/// `[rows, nh * dh]` output. `tiles` is a u32 device tensor of (first row, length, first query
/// row) per query tile of [`FLASH_QUERY_TILE`] rows.
pub struct FlashAttention<'a> {
    pub tiles: &'a Tensor,
    pub n_tiles: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
}

impl CustomOp1 for FlashAttention<'_> {
    gpu_only_op1!("grating-flash-attention");
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        fn run<T: CudaDType + DeviceRepr>(
            op: &FlashAttention<'_>,
            s: &CudaStorage,
            l: &Layout,
            rows: usize,
        ) -> Result<CudaStorage> {
            let dev = s.device();
            let f = kernel!(dev, format!("flash_attn_d{}", op.head_dim), s.dtype());
            let src = view::<T>(s, l)?;
            // SAFETY: uninitialised until the launch below, which writes all of it: the tiles
            // cover every row of every sequence of a packed layout (`ops::attention_flash`
            // checks that the spans tile the rows), a block per (tile, head) writes its 64
            // query rows that lie inside the sequence, and each lane stores columns
            // `n * 8 + 2 t, + 1` for all n < D / 8, t < 4: the head's D columns.
            let out = unsafe { dev.alloc::<T>(rows * op.n_heads * op.head_dim)? };
            let tiles = Operand::of(op.tiles);
            let tiles = tiles.view::<u32>()?;
            let scale_log2 = std::f32::consts::LOG2_E / (op.head_dim as f32).sqrt();
            let mut b = f.builder();
            b.arg(&src);
            b.arg(&out);
            b.arg(&tiles);
            candle_core::builder_arg!(
                b,
                op.n_heads as i32,
                op.n_kv_heads as i32,
                scale_log2,
                op.causal as i32
            );
            let cfg = LaunchConfig {
                grid_dim: (op.n_tiles as u32, op.n_heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the arguments match kernels.cu's `flash_attn_d{D}(const T *qkv, T *out,
            // const uint32_t *tiles, int nh, int nkv, float scale_log2, int causal)` with D the
            // head dim the kernel is named for; 128 threads are its FLASH_THREADS; the grid
            // reads tiles[3 x + 0..3] for x < n_tiles (the table holds 3 n_tiles: checked
            // below); qkv rows are (nh + 2 nkv) * D wide (checked below) and read, as `out`
            // rows are written, only at `start + r` with r < len, within the packed rows the
            // tiles were built from; 16-byte loads need the alignment checked below (row
            // strides are multiples of 16 bytes for D in FLASH_HEAD_DIMS).
            unsafe { b.launch(cfg) }.w()?;
            Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
        }
        if !FLASH_HEAD_DIMS.contains(&self.head_dim) {
            bail!("flash attention: head dim {} unsupported", self.head_dim);
        }
        check_heads("flash attention", self.n_heads, self.n_kv_heads)?;
        let width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim;
        if l.dims().len() != 2 || l.dims()[1] != width {
            bail!(
                "flash attention: qkv is {:?}, rows of {width} expected",
                l.dims()
            );
        }
        if self.tiles.elem_count() != 3 * self.n_tiles {
            bail!(
                "flash attention: the tile table does not hold {} tiles",
                self.n_tiles
            );
        }
        // The kernel loads 16-byte chunks of k and v rows.
        if (l.start_offset() * s.dtype().size_in_bytes()) % 16 != 0 {
            bail!("flash attention: qkv is not 16-byte aligned");
        }
        if self.n_tiles == 0 || self.n_tiles >= u32::MAX as usize || self.n_heads > 65535 {
            bail!("flash attention: {} query tiles", self.n_tiles);
        }
        let rows = l.dims()[0];
        let out = match s.dtype() {
            DType::F16 => run::<half::f16>(self, s, l, rows)?,
            DType::BF16 => run::<half::bf16>(self, s, l, rows)?,
            d => bail!("flash attention: no kernel for {d:?}"),
        };
        Ok((out, Shape::from((rows, self.n_heads * self.head_dim))))
    }
}

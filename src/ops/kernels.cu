// Fused GPU kernels for the layer stages that candle's generic ops run as chains of strided
// element-wise passes: SwiGLU, Qwen3's q/k RMSNorm + rotary embedding, and the glue of
// length-bucketed attention (packing rows into padded per-head blocks, a masked softmax with
// sequence lengths, unpacking back to packed rows). The GEMMs stay with cuBLAS.
//
// Every kernel exists for f32, f16 and bf16 (suffix _f32, _f16, _bf16); arithmetic is in f32.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

// out[r, j] = silu(gu[r, j]) * gu[r, inter + j]
// Index math is 32-bit (the host checks that sizes fit): 64-bit division costs several
// times more than the memory traffic of these kernels.
template <typename T>
__device__ void silu_mul(const T *gu, T *out, uint32_t rows, uint32_t inter) {
    uint32_t n = rows * inter;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        uint32_t r = i / inter, j = i - r * inter;
        size_t base = (size_t)r * 2 * inter;
        float g = to_f(gu[base + j]);
        float u = to_f(gu[base + inter + j]);
        out[i] = from_f<T>(g / (1.0f + __expf(-g)) * u);
    }
}

// Exact (erf) GELU in place: BERT's intermediate activation without a second buffer.
template <typename T> __device__ void gelu_erf_inplace(T *x, uint32_t n) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = to_f(x[i]);
        x[i] = from_f<T>(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
    }
}

// One warp per (row, head) of a fused [rows, (nh + 2 nkv) * dh] projection, 8 warps per block.
// q and k heads: RMSNorm over the head (gamma optional) then rotary embedding with the row's
// position (non-interleaved halves, as HF's rotate_half); v heads are copied. Lane j handles
// the pairs (i, i + dh / 2) for i = j, j + 32, ...: the sum of squares is a warp reduction.
template <typename T>
__device__ void qk_norm_rope(const T *qkv, T *out, const float *cos_t, const float *sin_t,
                             const uint32_t *pos, const T *q_gamma, const T *k_gamma, int nh,
                             int nkv, int dh, float eps, int64_t rows) {
    const int heads = nh + 2 * nkv;
    const int64_t item = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (item >= rows * heads) return;
    const int64_t row = item / heads;
    const int head = (int)(item - row * heads);
    const int lane = threadIdx.x % 32, half = dh / 2;
    const int64_t width = (int64_t)heads * dh;
    const T *x = qkv + row * width + (int64_t)head * dh;
    T *y = out + row * width + (int64_t)head * dh;
    if (head >= nh + nkv) {
        for (int i = lane; i < dh; i += 32) y[i] = x[i];
        return;
    }
    const T *gamma = head < nh ? q_gamma : k_gamma;
    float ss = 0.f;
    for (int i = lane; i < half; i += 32) {
        float a = to_f(x[i]), b = to_f(x[i + half]);
        ss += a * a + b * b;
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    const float rstd = rsqrtf(ss / dh + eps);
    const int64_t p = pos[row];
    for (int i = lane; i < half; i += 32) {
        float a = to_f(x[i]), b = to_f(x[i + half]);
        if (gamma != nullptr) {
            // HF rounds the normalised value to the compute dtype before the weight multiply.
            a = to_f(from_f<T>(to_f(from_f<T>(a * rstd)) * to_f(gamma[i])));
            b = to_f(from_f<T>(to_f(from_f<T>(b * rstd)) * to_f(gamma[i + half])));
        }
        float c = cos_t[p * half + i], s = sin_t[p * half + i];
        y[i] = from_f<T>(a * c - b * s);
        y[i + half] = from_f<T>(b * c + a * s);
    }
}

// Packs one length bucket of b sequences (starts/lens, padded to lmax) from a packed
// [rows, (nh + 2 nkv) * dh] projection into
//   q: [b, nkv, rep, lmax, dh] (scaled), k, v: [b, nkv, lmax, dh]
// laid end to end in `dst`. The rep query heads sharing a kv head are stacked along the
// query axis, so one batched GEMM per (sequence, kv head) serves grouped-query attention.
// Padding rows are zero.
template <typename T>
__device__ void attn_pack(const T *qkv, T *dst, const uint32_t *starts, const uint32_t *lens,
                          int b, int lmax, int nh, int nkv, int dh, float scale) {
    uint32_t width = (uint32_t)(nh + 2 * nkv) * dh;
    uint32_t n = (uint32_t)b * lmax * width;
    uint32_t rep = nh / nkv;
    uint32_t q_elems = (uint32_t)b * nh * lmax * dh;
    uint32_t kv_elems = (uint32_t)b * nkv * lmax * dh;
    for (uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += gridDim.x * blockDim.x) {
        uint32_t sp = idx / width, e = idx - sp * width;
        uint32_t s = sp / lmax, p = sp - s * lmax;
        uint32_t head = e / dh, d = e - head * dh;
        uint32_t len = lens[s];
        float v = 0.f;
        if (p < len) v = to_f(qkv[((size_t)starts[s] + p) * width + e]);
        if (head < (uint32_t)nh) {
            uint32_t kvh = head / rep, r = head - kvh * rep;
            dst[(((s * nkv + kvh) * rep + r) * lmax + p) * dh + d] = from_f<T>(v * scale);
        } else if (head < (uint32_t)(nh + nkv)) {
            uint32_t kh = head - nh;
            dst[q_elems + ((s * nkv + kh) * lmax + p) * dh + d] = from_f<T>(v);
        } else {
            uint32_t vh = head - nh - nkv;
            dst[q_elems + kv_elems + ((s * nkv + vh) * lmax + p) * dh + d] = from_f<T>(v);
        }
    }
}

// In place over scores [b * nkv, rep * lmax, lmax]: softmax of each query row over the keys
// its sequence has (j < len, and j <= query position when causal); everything else is 0.
// One warp per row.
template <typename T>
__device__ void masked_softmax(T *scores, const uint32_t *lens, int64_t rows, int nkv, int rep,
                               int lmax, int causal) {
    int64_t row = blockIdx.x * (int64_t)(blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int p = row % lmax;
    int s = row / ((int64_t)nkv * rep * lmax);
    int len = lens[s];
    int valid = p < len ? (causal ? p + 1 : len) : 0;
    T *x = scores + row * lmax;
    float m = -INFINITY;
    for (int j = lane; j < valid; j += 32) m = fmaxf(m, to_f(x[j]));
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
    float sum = 0.f;
    for (int j = lane; j < valid; j += 32) sum += __expf(to_f(x[j]) - m);
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
    float inv = valid > 0 ? 1.f / sum : 0.f;
    for (int j = lane; j < lmax; j += 32) {
        float v = j < valid ? __expf(to_f(x[j]) - m) * inv : 0.f;
        x[j] = from_f<T>(v);
    }
}

// Scatters attention output [b, nkv, rep, lmax, dh] back to packed rows of out [rows, nh * dh]
// (only each sequence's real positions).
template <typename T>
__device__ void attn_unpack(const T *o, T *out, const uint32_t *starts, const uint32_t *lens,
                            int b, int lmax, int nh, int nkv, int dh) {
    uint32_t width = (uint32_t)nh * dh;
    uint32_t n = (uint32_t)b * lmax * width;
    uint32_t rep = nh / nkv;
    for (uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x; idx < n;
         idx += gridDim.x * blockDim.x) {
        uint32_t sp = idx / width, e = idx - sp * width;
        uint32_t s = sp / lmax, p = sp - s * lmax;
        if (p >= lens[s]) continue;
        uint32_t head = e / dh, d = e - head * dh;
        uint32_t kvh = head / rep, r = head - kvh * rep;
        out[((size_t)starts[s] + p) * width + e] = o[(((s * nkv + kvh) * rep + r) * lmax + p) * dh + d];
    }
}


// `x + residual` (when given, also stored to `sum`) then RMSNorm with weight, one block per
// row. Rounding follows HF's Qwen3RMSNorm: the sum is in the tensor dtype, the statistics in
// f32, the normalised value is rounded to the dtype before the weight multiply.
template <typename T>
__device__ void add_rms_norm(const T *x, const T *res, const T *gamma, T *out, T *sum, int d,
                             float eps) {
    int64_t row = blockIdx.x;
    const T *xr = x + row * d;
    const T *rr = res ? res + row * d : nullptr;
    float ss = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = to_f(xr[j]);
        if (rr) {
            T s = from_f<T>(v + to_f(rr[j]));
            sum[row * d + j] = s;
            v = to_f(s);
        }
        ss += v * v;
    }
    __shared__ float warp_sums[32];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.f;
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffff, t, o);
        if (threadIdx.x == 0) warp_sums[0] = t;
    }
    __syncthreads();
    float rstd = rsqrtf(warp_sums[0] / d + eps);
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float v = rr ? to_f(sum[row * d + j]) : to_f(xr[j]);
        out[row * d + j] = from_f<T>(to_f(from_f<T>(v * rstd)) * to_f(gamma[j]));
    }
}

// ---------------------------------------------------------------------------------------------
// Flash attention over packed variable-length sequences (f16 / bf16, tensor cores).
//
// Reads q, k, v straight from the fused [rows, (nh + 2 nkv) * D] projection and writes the
// packed [rows, nh * D] output: no padding, no score matrix in memory. One block of 4 warps
// per (query tile of 64 rows of one sequence, query head); each warp owns 16 query rows. Key
// and value tiles of 64 rows go through shared memory; S = Q K^T and O += P V use
// mma.m16n8k16 with f32 accumulation, and the softmax is the online (running max / sum) one,
// in base 2. `tiles` holds (first row, length, first query row) per query tile.

template <typename T> struct Mma;
// mma.m16n8k16 (f32 accumulators c, A fragment a, B fragment b0 b1) and packing two floats
// into one register of the element type, per 16-bit type.
#define MMA_FOR(T, T2, PTX_TYPE, PACK)                                                            \
    template <> struct Mma<T> {                                                                  \
        static __device__ __forceinline__ void run(float c[4], const uint32_t a[4], uint32_t b0, \
                                                   uint32_t b1) {                                \
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE ".f32 "   \
                         "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                \
                         : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                        \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));         \
        }                                                                                        \
        static __device__ __forceinline__ uint32_t pack(float lo, float hi) {                    \
            T2 v = PACK(lo, hi);                                                                 \
            return *reinterpret_cast<uint32_t *>(&v);                                            \
        }                                                                                        \
    };
MMA_FOR(__nv_bfloat16, __nv_bfloat162, "bf16", __floats2bfloat162_rn)
MMA_FOR(__half, __half2, "f16", __floats2half2_rn)

// Four transposed 8x8 b16 matrices from shared memory; lanes 8i..8i+7 address matrix i's rows.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *row_addr) {
    uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_addr));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
    uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    int n = valid ? 16 : 0; // zero-fills when the row is past the sequence
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n"); }

constexpr int FLASH_BM = 64;
constexpr int FLASH_BN = 64;
constexpr int FLASH_THREADS = 128;

template <typename T, int D>
__device__ void flash_attn(const T *qkv, T *out, const uint32_t *tiles, int nh, int nkv,
                           float scale_log2, int causal) {
    constexpr int STRIDE = D + 8; // padded smem rows: conflict-free fragment loads
    constexpr int CHUNKS = D / 8; // 16-byte chunks per row
    __shared__ __align__(16) T ks[FLASH_BN * STRIDE];
    __shared__ __align__(16) T vs[FLASH_BN * STRIDE];

    const uint32_t start = tiles[3 * blockIdx.x], len = tiles[3 * blockIdx.x + 1];
    const int m0 = tiles[3 * blockIdx.x + 2];
    const int head = blockIdx.y, kvh = head / (nh / nkv);
    const int64_t width = (int64_t)(nh + 2 * nkv) * D;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int r0 = m0 + warp * 16 + g, r1 = r0 + 8;
    const bool ok0 = r0 < (int)len, ok1 = r1 < (int)len;

    const T *base = qkv + (int64_t)start * width;
    const T *q0 = base + (int64_t)r0 * width + head * D;
    const T *q1 = base + (int64_t)r1 * width + head * D;
    uint32_t qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        int c = kk * 16 + 2 * t;
        qf[kk][0] = ok0 ? *reinterpret_cast<const uint32_t *>(q0 + c) : 0u;
        qf[kk][1] = ok1 ? *reinterpret_cast<const uint32_t *>(q1 + c) : 0u;
        qf[kk][2] = ok0 ? *reinterpret_cast<const uint32_t *>(q0 + c + 8) : 0u;
        qf[kk][3] = ok1 ? *reinterpret_cast<const uint32_t *>(q1 + c + 8) : 0u;
    }

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_0 = -INFINITY, m_1 = -INFINITY, l_0 = 0.f, l_1 = 0.f;

    const int kv_end = causal ? min((int)len, m0 + FLASH_BM) : (int)len;
    const T *kb = base + (int64_t)(nh + kvh) * D;
    const T *vb = base + (int64_t)(nh + nkv + kvh) * D;
    for (int n0 = 0; n0 < kv_end; n0 += FLASH_BN) {
        __syncthreads(); // every warp is done with the previous tile
        for (int c = threadIdx.x; c < FLASH_BN * CHUNKS; c += FLASH_THREADS) {
            int r = c / CHUNKS, col = (c % CHUNKS) * 8;
            bool valid = n0 + r < kv_end;
            int64_t src = (int64_t)(valid ? n0 + r : 0) * width + col;
            cp_async16(ks + r * STRIDE + col, kb + src, valid);
            cp_async16(vs + r * STRIDE + col, vb + src, valid);
        }
        cp_async_commit();
        cp_async_wait_all();
        __syncthreads();

        float s[FLASH_BN / 8][4];
#pragma unroll
        for (int j = 0; j < FLASH_BN / 8; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
            const T *kr = ks + (j * 8 + g) * STRIDE + 2 * t;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                uint32_t b0 = *reinterpret_cast<const uint32_t *>(kr + kk * 16);
                uint32_t b1 = *reinterpret_cast<const uint32_t *>(kr + kk * 16 + 8);
                Mma<T>::run(s[j], qf[kk], b0, b1);
            }
        }

        float mx0 = m_0, mx1 = m_1;
#pragma unroll
        for (int j = 0; j < FLASH_BN / 8; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int key = n0 + j * 8 + 2 * t + e;
                bool in = key < kv_end;
                s[j][e] = (in && (!causal || key <= r0)) ? s[j][e] * scale_log2 : -INFINITY;
                s[j][2 + e] = (in && (!causal || key <= r1)) ? s[j][2 + e] * scale_log2 : -INFINITY;
                mx0 = fmaxf(mx0, s[j][e]);
                mx1 = fmaxf(mx1, s[j][2 + e]);
            }
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, off));
        }
        // Rows with no visible key yet keep a finite reference so no inf - inf appears.
        const float ref0 = mx0 == -INFINITY ? 0.f : mx0;
        const float ref1 = mx1 == -INFINITY ? 0.f : mx1;
        const float alpha0 = exp2f(m_0 - ref0), alpha1 = exp2f(m_1 - ref1);
        m_0 = mx0;
        m_1 = mx1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int j = 0; j < FLASH_BN / 8; j++) {
            s[j][0] = exp2f(s[j][0] - ref0);
            s[j][1] = exp2f(s[j][1] - ref0);
            s[j][2] = exp2f(s[j][2] - ref1);
            s[j][3] = exp2f(s[j][3] - ref1);
            sum0 += s[j][0] + s[j][1];
            sum1 += s[j][2] + s[j][3];
        }
        l_0 = l_0 * alpha0 + sum0;
        l_1 = l_1 * alpha1 + sum1;
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            o[n][0] *= alpha0;
            o[n][1] *= alpha0;
            o[n][2] *= alpha1;
            o[n][3] *= alpha1;
        }

        const int mat = lane / 8, mrow = lane % 8;
#pragma unroll
        for (int kk = 0; kk < FLASH_BN / 16; kk++) {
            uint32_t pa[4] = {
                Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
            const T *vrow = vs + (kk * 16 + (mat & 1) * 8 + mrow) * STRIDE + (mat >> 1) * 8;
#pragma unroll
            for (int n = 0; n < D / 8; n += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, vrow + n * 8);
                Mma<T>::run(o[n], pa, b[0], b[1]);
                Mma<T>::run(o[n + 1], pa, b[2], b[3]);
            }
        }
    }

#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_0 += __shfl_xor_sync(0xffffffff, l_0, off);
        l_1 += __shfl_xor_sync(0xffffffff, l_1, off);
    }
    const float inv0 = l_0 > 0.f ? 1.f / l_0 : 0.f, inv1 = l_1 > 0.f ? 1.f / l_1 : 0.f;
    const int64_t out_width = (int64_t)nh * D;
    T *y0 = out + ((int64_t)start + r0) * out_width + head * D + 2 * t;
    T *y1 = out + ((int64_t)start + r1) * out_width + head * D + 2 * t;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
        if (ok0) *reinterpret_cast<uint32_t *>(y0 + n * 8) = Mma<T>::pack(o[n][0] * inv0, o[n][1] * inv0);
        if (ok1) *reinterpret_cast<uint32_t *>(y1 + n * 8) = Mma<T>::pack(o[n][2] * inv1, o[n][3] * inv1);
    }
}

#define FLASH(T, SUFFIX, D)                                                                       \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS)                                  \
        flash_attn_d##D##_##SUFFIX(const T *qkv, T *out, const uint32_t *tiles, int nh, int nkv, \
                                   float scale_log2, int causal) {                               \
        flash_attn<T, D>(qkv, out, tiles, nh, nkv, scale_log2, causal);                          \
    }
FLASH(__nv_bfloat16, bf16, 32)
FLASH(__nv_bfloat16, bf16, 64)
FLASH(__nv_bfloat16, bf16, 128)
FLASH(__half, f16, 32)
FLASH(__half, f16, 64)
FLASH(__half, f16, 128)

#define INSTANTIATE(T, SUFFIX)                                                                    \
    extern "C" __global__ void silu_mul_##SUFFIX(const T *gu, T *out, uint32_t rows,             \
                                                 uint32_t inter) {                               \
        silu_mul<T>(gu, out, rows, inter);                                                       \
    }                                                                                            \
    extern "C" __global__ void qk_norm_rope_##SUFFIX(                                            \
        const T *qkv, T *out, const float *cos_t, const float *sin_t, const uint32_t *pos,       \
        const T *q_gamma, const T *k_gamma, int nh, int nkv, int dh, float eps, int64_t rows) {  \
        qk_norm_rope<T>(qkv, out, cos_t, sin_t, pos, q_gamma, k_gamma, nh, nkv, dh, eps, rows);  \
    }                                                                                            \
    extern "C" __global__ void attn_pack_##SUFFIX(const T *qkv, T *dst, const uint32_t *starts,  \
                                                  const uint32_t *lens, int b, int lmax, int nh, \
                                                  int nkv, int dh, float scale) {                \
        attn_pack<T>(qkv, dst, starts, lens, b, lmax, nh, nkv, dh, scale);                       \
    }                                                                                            \
    extern "C" __global__ void masked_softmax_##SUFFIX(T *scores, const uint32_t *lens,          \
                                                       int64_t rows, int nkv, int rep, int lmax, \
                                                       int causal) {                             \
        masked_softmax<T>(scores, lens, rows, nkv, rep, lmax, causal);                           \
    }                                                                                            \
    extern "C" __global__ void attn_unpack_##SUFFIX(const T *o, T *out, const uint32_t *starts,  \
                                                    const uint32_t *lens, int b, int lmax,       \
                                                    int nh, int nkv, int dh) {                   \
        attn_unpack<T>(o, out, starts, lens, b, lmax, nh, nkv, dh);                              \
    }                                                                                            \
    extern "C" __global__ void gelu_erf_inplace_##SUFFIX(T *x, uint32_t n) {                    \
        gelu_erf_inplace<T>(x, n);                                                               \
    }                                                                                            \
    extern "C" __global__ void add_rms_norm_##SUFFIX(const T *x, const T *res, const T *gamma,   \
                                                     T *out, T *sum, int d, float eps) {         \
        add_rms_norm<T>(x, res, gamma, out, sum, d, eps);                                        \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)

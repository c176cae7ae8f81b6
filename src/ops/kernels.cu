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

// One block per (row, head) of a fused [rows, (nh + 2 nkv) * dh] projection, dh / 2 threads.
// q and k heads: RMSNorm over the head (gamma optional) then rotary embedding with the row's
// position (non-interleaved halves, as HF's rotate_half); v heads are copied.
template <typename T>
__device__ void qk_norm_rope(const T *qkv, T *out, const float *cos_t, const float *sin_t,
                             const uint32_t *pos, const T *q_gamma, const T *k_gamma, int nh,
                             int nkv, int dh, float eps) {
    int64_t row = blockIdx.x;
    int head = blockIdx.y;
    int half = dh / 2;
    int i = threadIdx.x;
    int64_t width = (int64_t)(nh + 2 * nkv) * dh;
    const T *x = qkv + row * width + (int64_t)head * dh;
    T *y = out + row * width + (int64_t)head * dh;
    float a = to_f(x[i]);
    float b = to_f(x[i + half]);
    if (head >= nh + nkv) {
        y[i] = x[i];
        y[i + half] = x[i + half];
        return;
    }
    const T *gamma = head < nh ? q_gamma : k_gamma;
    if (gamma != nullptr) {
        // dh / 2 <= 512 threads; a plain shared-memory sum also works for heads under a warp.
        __shared__ float partial[512];
        partial[i] = a * a + b * b;
        __syncthreads();
        if (i == 0) {
            float t = 0.f;
            for (int w = 0; w < half; w++) t += partial[w];
            partial[0] = t;
        }
        __syncthreads();
        float rstd = rsqrtf(partial[0] / dh + eps);
        // HF rounds the normalised value to the compute dtype before the weight multiply.
        a = to_f(from_f<T>(a * rstd)) * to_f(gamma[i]);
        b = to_f(from_f<T>(b * rstd)) * to_f(gamma[i + half]);
        a = to_f(from_f<T>(a));
        b = to_f(from_f<T>(b));
    }
    int64_t p = pos[row];
    float c = cos_t[p * half + i], s = sin_t[p * half + i];
    y[i] = from_f<T>(a * c - b * s);
    y[i + half] = from_f<T>(b * c + a * s);
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

#define INSTANTIATE(T, SUFFIX)                                                                    \
    extern "C" __global__ void silu_mul_##SUFFIX(const T *gu, T *out, uint32_t rows,             \
                                                 uint32_t inter) {                               \
        silu_mul<T>(gu, out, rows, inter);                                                       \
    }                                                                                            \
    extern "C" __global__ void qk_norm_rope_##SUFFIX(                                            \
        const T *qkv, T *out, const float *cos_t, const float *sin_t, const uint32_t *pos,       \
        const T *q_gamma, const T *k_gamma, int nh, int nkv, int dh, float eps) {                \
        qk_norm_rope<T>(qkv, out, cos_t, sin_t, pos, q_gamma, k_gamma, nh, nkv, dh, eps);        \
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
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)

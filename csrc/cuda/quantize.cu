// CUDA block quantiser (+ EF state update) and dequantiser (+ accumulate).
// One thread block per quantisation block (grid-stride over blocks): pass 1 reduces absmax and
// a non-finite flag through warp shuffles and shared memory, pass 2 lets each thread assemble
// whole code bytes (1, 2 or 4 codes) so packed int4/int2 need no atomics.
// Bit-identical to the CPU kernels: see kernels_cuda.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "cuda/kernels_cuda.h"
#include "kernels.h"

namespace lococomm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, int M>
__device__ __forceinline__ float pre(const T* x, const float* s, int64_t i) {
  const float xv = to_f(x[i]);
  if (M == kQuantEF) return __fadd_rn(xv, s[i]);
  if (M == kQuantEF21) return __fsub_rn(xv, s[i]);
  return xv;
}

template <typename T, int M, bool Stochastic, int Bits>
__global__ void quantize_kernel(const T* __restrict__ x, const float* s, float* s_out, int64_t n,
                                int64_t B, uint8_t* __restrict__ codes,
                                float* __restrict__ scales, uint32_t k0, uint32_t k1,
                                uint64_t offset, bool propagate, unsigned long long* bad) {
  constexpr int per = 8 / Bits;
  constexpr int mask = (1 << Bits) - 1;
  const float qmax = static_cast<float>(qmax_of_bits(Bits));
  const int64_t nblocks = (n + B - 1) / B;
  __shared__ float smax[kWarps];
  __shared__ int sbad[kWarps];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t start = b * B;
    const int64_t len = min(B, n - start);

    // Pass 1: absmax and non-finite flag.
    float m = 0.0f;
    int nf = 0;
    for (int64_t j = tid; j < len; j += blockDim.x) {
      const float p = pre<T, M>(x, s, start + j);
      nf |= !isfinite(p);
      const float a = fabsf(p);
      m = a > m ? a : m;
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float mo = __shfl_xor_sync(0xffffffffu, m, o);
      m = mo > m ? mo : m;
      nf |= __shfl_xor_sync(0xffffffffu, nf, o);
    }
    if (lane == 0) {
      smax[warp] = m;
      sbad[warp] = nf;
    }
    __syncthreads();
    m = 0.0f;
    nf = 0;
    for (int w = 0; w < kWarps; ++w) {
      m = smax[w] > m ? smax[w] : m;
      nf |= sbad[w];
    }
    __syncthreads();  // smax/sbad are reused by the next block

    const int64_t nbytes = (len + per - 1) / per;
    uint8_t* cb = codes + start / per;
    if (nf) {  // nothing of this block is transmitted (see kernels.h)
      if (tid == 0) {
        scales[b] = propagate ? __int_as_float(0x7fc00000) : 0.0f;
        atomicAdd(bad, 1ull);
      }
      for (int64_t g = tid; g < nbytes; g += blockDim.x) cb[g] = 0;
      if (M != kQuantPlain) {
        for (int64_t j = tid; j < len; j += blockDim.x) {
          const int64_t i = start + j;
          s_out[i] = M == kQuantEF ? pre<T, M>(x, s, i) : s[i];
        }
      }
      continue;
    }

    const float scale = __fdiv_rn(m, qmax);
    const float inv = m > 0.0f ? __fdiv_rn(qmax, m) : 0.0f;
    if (tid == 0) scales[b] = scale;

    // Pass 2: each thread builds whole bytes.
    for (int64_t g = tid; g < nbytes; g += blockDim.x) {
      unsigned int byte = 0;
      for (int k = 0; k < per; ++k) {
        const int64_t j = g * per + k;
        if (j >= len) break;
        const int64_t i = start + j;
        const float p = pre<T, M>(x, s, i);
        const float v = __fmul_rn(p, inv);
        float r;
        if (Stochastic) {
          const uint64_t gi = offset + static_cast<uint64_t>(i);
          const float u =
              u32_to_unit(rng_u32(static_cast<uint32_t>(gi), k0, rng_hi_key(gi, k1)));
          r = floorf(__fadd_rn(v, u));
        } else {
          r = rintf(v);  // round half to even, like nearbyint / torch.round
        }
        r = r < -qmax ? -qmax : r;
        r = r > qmax ? qmax : r;
        r = __fadd_rn(r, 0.0f);  // -0 -> +0, as the reference's integer codes
        const int q = static_cast<int>(r);
        byte |= static_cast<unsigned int>(q & mask) << (k * Bits);
        if (M == kQuantEF) s_out[i] = __fsub_rn(p, __fmul_rn(r, scale));
        if (M == kQuantEF21) s_out[i] = __fadd_rn(s[i], __fmul_rn(r, scale));
      }
      cb[g] = static_cast<uint8_t>(byte);
    }
  }
}

template <int Bits, bool Acc>
__global__ void dequantize_kernel(const uint8_t* __restrict__ codes,
                                  const float* __restrict__ scales, float* __restrict__ out,
                                  int64_t n, int64_t B) {
  constexpr int per = 8 / Bits;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const unsigned int byte = codes[i / per];
    const int sh = static_cast<int>(i % per) * Bits;
    // sign-extend the Bits-wide field
    const int q = static_cast<int>(byte << (32 - Bits - sh)) >> (32 - Bits);
    const float d = __fmul_rn(static_cast<float>(q), scales[i / B]);
    out[i] = Acc ? __fadd_rn(out[i], d) : d;
  }
}

int grid_for(int64_t items) {
  const int64_t g = items < 65535 * 8 ? items : 65535 * 8;
  return static_cast<int>(g > 0 ? g : 1);
}

template <typename T, int M, bool S>
void launch_bits(const T* x, const float* s, float* so, int64_t n, uint8_t* codes, float* sc,
                 const QuantParams& qp, unsigned long long* bad, cudaStream_t st) {
  const int grid = grid_for((n + qp.block - 1) / qp.block);
  const auto off = qp.index_offset;
  switch (qp.bits) {
    case 8:
      quantize_kernel<T, M, S, 8><<<grid, kThreads, 0, st>>>(x, s, so, n, qp.block, codes, sc,
                                                             qp.k0, qp.k1, off, qp.propagate,
                                                             bad);
      break;
    case 4:
      quantize_kernel<T, M, S, 4><<<grid, kThreads, 0, st>>>(x, s, so, n, qp.block, codes, sc,
                                                             qp.k0, qp.k1, off, qp.propagate,
                                                             bad);
      break;
    default:
      quantize_kernel<T, M, S, 2><<<grid, kThreads, 0, st>>>(x, s, so, n, qp.block, codes, sc,
                                                             qp.k0, qp.k1, off, qp.propagate,
                                                             bad);
  }
}

template <typename T, int M>
void launch_mode(const T* x, const float* s, float* so, int64_t n, uint8_t* codes, float* sc,
                 const QuantParams& qp, unsigned long long* bad, cudaStream_t st) {
  if (qp.stochastic) {
    launch_bits<T, M, true>(x, s, so, n, codes, sc, qp, bad, st);
  } else {
    launch_bits<T, M, false>(x, s, so, n, codes, sc, qp, bad, st);
  }
}

template <typename T>
void launch_type(const T* x, const float* s, float* so, int64_t n, uint8_t* codes, float* sc,
                 const QuantParams& qp, QuantMode mode, unsigned long long* bad,
                 cudaStream_t st) {
  switch (mode) {
    case kQuantEF:
      launch_mode<T, kQuantEF>(x, s, so, n, codes, sc, qp, bad, st);
      break;
    case kQuantEF21:
      launch_mode<T, kQuantEF21>(x, s, so, n, codes, sc, qp, bad, st);
      break;
    default:
      launch_mode<T, kQuantPlain>(x, s, so, n, codes, sc, qp, bad, st);
  }
}

}  // namespace

void quantize(const void* x, InputType type, const float* state, float* state_out, int64_t n,
              uint8_t* codes, float* scales, const QuantParams& qp, QuantMode mode,
              unsigned long long* bad, cudaStream_t stream) {
  if (n == 0) return;
  switch (type) {
    case kF16:
      launch_type(static_cast<const __half*>(x), state, state_out, n, codes, scales, qp, mode,
                  bad, stream);
      break;
    case kBF16:
      launch_type(static_cast<const __nv_bfloat16*>(x), state, state_out, n, codes, scales, qp,
                  mode, bad, stream);
      break;
    default:
      launch_type(static_cast<const float*>(x), state, state_out, n, codes, scales, qp, mode,
                  bad, stream);
  }
}

void dequantize(const uint8_t* codes, const float* scales, float* out, int64_t n, int bits,
                int64_t block, bool accumulate, cudaStream_t stream) {
  if (n == 0) return;
  const int grid = grid_for((n + kThreads - 1) / kThreads);
#define LOCOCOMM_DQ(BITS)                                                                   \
  if (accumulate) {                                                                         \
    dequantize_kernel<BITS, true><<<grid, kThreads, 0, stream>>>(codes, scales, out, n,     \
                                                                 block);                    \
  } else {                                                                                  \
    dequantize_kernel<BITS, false><<<grid, kThreads, 0, stream>>>(codes, scales, out, n,    \
                                                                  block);                   \
  }
  switch (bits) {
    case 8:
      LOCOCOMM_DQ(8)
      break;
    case 4:
      LOCOCOMM_DQ(4)
      break;
    default:
      LOCOCOMM_DQ(2)
  }
#undef LOCOCOMM_DQ
}

}  // namespace cuda
}  // namespace lococomm

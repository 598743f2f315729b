// Shared definitions of the lococomm kernels: counter-based RNG and block-quantiser constants.
//
// Everything here is plain C++ (usable from host code and, through LOCOCOMM_HD, from CUDA
// device code). The Python reference in src/lococomm/ops/reference.py implements the very same
// functions with int64 torch tensors; tests compare them bit for bit.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LOCOCOMM_HD __host__ __device__ __forceinline__
#else
#define LOCOCOMM_HD inline
#endif

namespace lococomm {

// "lowbias32" integer hash (Chris Wellons' hash-prospector): a bijection on 32-bit words with
// very low avalanche bias. Two rounds of it make the counter-based RNG below.
LOCOCOMM_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Random 32-bit word for element `index` of a stream keyed by (k0, k1). The keys are derived
// from the user's integer seed in Python (ops.reference.rng_keys) and passed in, so there is one
// definition of the seed -> key mapping. `kh` is mix32(hi32(index) ^ k1), constant for runs of
// 2^32 indices, so kernels hoist it out of their loops.
LOCOCOMM_HD uint32_t rng_hi_key(uint64_t index, uint32_t k1) {
  return mix32(static_cast<uint32_t>(index >> 32) ^ k1);
}
LOCOCOMM_HD uint32_t rng_u32(uint32_t index_lo, uint32_t k0, uint32_t kh) {
  return mix32(mix32(index_lo + k0) ^ kh);
}
// Uniform float in [0, 1) with 24 random bits; exact in fp32 (no rounding anywhere).
LOCOCOMM_HD float u32_to_unit(uint32_t r) {
  return static_cast<float>(r >> 8) * (1.0f / 16777216.0f);
}

// Symmetric block quantiser: codes in [-qmax, qmax] with qmax = 2^(bits-1) - 1.
LOCOCOMM_HD int qmax_of_bits(int bits) { return (1 << (bits - 1)) - 1; }
// How many codes share one byte on the wire (8 / bits).
LOCOCOMM_HD int codes_per_byte(int bits) { return 8 / bits; }

}  // namespace lococomm

// Block-absmax quantiser (int8 / int4 / int2), fused with the error-feedback state update, and
// its dequantiser (optionally accumulating into fp32). Reference: ops/reference.py
// quantize_blocks / dequantize_blocks; the maths per element is
//   scale = absmax / qmax,   inv = qmax / absmax (0 for an all-zero block)
//   q = clamp(round_half_even(p * inv))            nearest
//   q = clamp(floor(p * inv + u)), u = rng(i)       stochastic, unbiased
//   decode = q * scale
// Each block is processed twice while it is hot in L1: pass 1 finds absmax and non-finite
// values, pass 2 writes codes (and the new EF state) exactly once.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "common.h"
#include "kernels.h"

namespace lococomm {
namespace {

constexpr int64_t kTile = 256;  // codes are produced in tiles of this many elements, then packed

template <typename T, QuantMode M>
inline float pre(const T* x, const float* s, int64_t i) {
  const float xv = static_cast<float>(x[i]);
  if constexpr (M == kQuantPlain) {
    return xv;
  } else if constexpr (M == kQuantEF) {
    return xv + s[i];
  } else {
    return xv - s[i];
  }
}

// Packs `len` int8 codes (len <= kTile) into bytes, little end first, zero padded.
inline void pack_tile(const int8_t* q, int64_t len, int bits, uint8_t* out) {
  if (bits == 8) {
    std::memcpy(out, q, static_cast<size_t>(len));
    return;
  }
  const int per = codes_per_byte(bits);
  const int64_t nbytes = (len + per - 1) / per;
  if (bits == 4) {
    for (int64_t g = 0; g < nbytes; ++g) {
      const int64_t i = 2 * g;
      const uint8_t lo = static_cast<uint8_t>(q[i]) & 0xF;
      const uint8_t hi = i + 1 < len ? static_cast<uint8_t>(q[i + 1]) & 0xF : 0;
      out[g] = static_cast<uint8_t>(lo | (hi << 4));
    }
  } else {  // bits == 2
    for (int64_t g = 0; g < nbytes; ++g) {
      uint8_t v = 0;
      for (int k = 0; k < 4; ++k) {
        const int64_t i = 4 * g + k;
        if (i < len) v |= static_cast<uint8_t>((static_cast<uint8_t>(q[i]) & 0x3) << (2 * k));
      }
      out[g] = v;
    }
  }
}

// Unpacks `len` codes starting at element `first` of a packed stream (first % per == 0).
inline void unpack_tile(const uint8_t* codes, int64_t first, int64_t len, int bits, int8_t* q) {
  if (bits == 8) {
    std::memcpy(q, codes + first, static_cast<size_t>(len));
    return;
  }
  const int per = codes_per_byte(bits);
  const uint8_t* src = codes + first / per;
  if (bits == 4) {
    const int64_t full = len / 2;
    for (int64_t g = 0; g < full; ++g) {
      const uint8_t b = src[g];
      q[2 * g] = static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4;
      q[2 * g + 1] = static_cast<int8_t>(b) >> 4;
    }
    if (len & 1) q[len - 1] = static_cast<int8_t>(static_cast<uint8_t>(src[full] << 4)) >> 4;
  } else {
    const int64_t full = len / 4;
    for (int64_t g = 0; g < full; ++g) {
      const uint8_t b = src[g];
      q[4 * g] = static_cast<int8_t>(static_cast<uint8_t>(b << 6)) >> 6;
      q[4 * g + 1] = static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 6;
      q[4 * g + 2] = static_cast<int8_t>(static_cast<uint8_t>(b << 2)) >> 6;
      q[4 * g + 3] = static_cast<int8_t>(b) >> 6;
    }
    for (int64_t i = 4 * full; i < len; ++i) {
      const uint8_t b = src[i >> 2];
      const int sh = 6 - 2 * static_cast<int>(i & 3);
      q[i] = static_cast<int8_t>(static_cast<uint8_t>(b << sh)) >> 6;
    }
  }
}

// ---- explicit SIMD (GCC/Clang vector extensions: one zmm, two ymm or four xmm registers) ----
constexpr int W = 16;
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef int8_t vb __attribute__((vector_size(W)));
typedef int32_t vi8 __attribute__((vector_size(8 * 4)));
typedef uint8_t vb8 __attribute__((vector_size(8)));
typedef int32_t vi4 __attribute__((vector_size(4 * 4)));
typedef uint8_t vb4 __attribute__((vector_size(4)));

inline vf splat(float v) { return vf{} + v; }

template <typename T>
inline vf load_vec(const T* p) {
  float tmp[W];
  for (int l = 0; l < W; ++l) tmp[l] = static_cast<float>(p[l]);
  vf v;
  std::memcpy(&v, tmp, sizeof(v));
  return v;
}
template <>
inline vf load_vec<float>(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <>
inline vf load_vec<c10::BFloat16>(const c10::BFloat16* p) {
  typedef uint16_t vh __attribute__((vector_size(W * 2)));
  vh h;
  std::memcpy(&h, p, sizeof(h));
  const vu bits = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
inline void store_vec(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// Non-temporal ("streaming") stores: outputs far larger than the caches are written without
// first reading their lines (no read-for-ownership), which is most of the write cost here.
// Used only when the destination is 64-byte aligned; an sfence after the kernel orders them.
template <bool NT>
inline void put_vec(float* p, vf v) {
#if defined(__AVX512F__)
  if constexpr (NT) {
    __m512 m;
    std::memcpy(&m, &v, sizeof(m));
    _mm512_stream_ps(p, m);
    return;
  }
#elif defined(__AVX__)
  if constexpr (NT) {
    __m256 m[2];
    std::memcpy(m, &v, sizeof(m));
    _mm256_stream_ps(p, m[0]);
    _mm256_stream_ps(p + 8, m[1]);
    return;
  }
#endif
  store_vec(p, v);
}
template <bool NT, int Bytes>
inline void put_bytes(uint8_t* p, const void* src) {
#if defined(__SSE2__)
  if constexpr (NT && Bytes == 16) {
    __m128i m;
    std::memcpy(&m, src, 16);
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), m);
    return;
  } else if constexpr (NT && Bytes == 8 && sizeof(long long) == 8) {
    long long m;
    std::memcpy(&m, src, 8);
    _mm_stream_si64(reinterpret_cast<long long*>(p), m);
    return;
  } else if constexpr (NT && Bytes == 4) {
    int m;
    std::memcpy(&m, src, 4);
    _mm_stream_si32(reinterpret_cast<int*>(p), m);
    return;
  }
#endif
  std::memcpy(p, src, Bytes);
}
inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <typename T, QuantMode M>
inline vf pre_vec(const T* x, const float* s, int64_t i) {
  const vf xv = load_vec<T>(x + i);
  if constexpr (M == kQuantPlain) {
    return xv;
  } else if constexpr (M == kQuantEF) {
    return xv + load_vec<float>(s + i);
  } else {
    return xv - load_vec<float>(s + i);
  }
}

// Software prefetch: the block loop alternates a memory-bound pass 1 and an L1-bound pass 2, so
// the hardware prefetcher alone leaves memory idle during pass 2. Requesting lines kPrefetch
// elements (4 KiB) ahead from pass 1 keeps loads in flight throughout; measured +40-60 %.
// The T0 hint matters: an NTA prefetch lets the line leave L1 before pass 2 re-reads it.
constexpr int64_t kPrefetch = 1024;
template <typename T, QuantMode M>
inline void prefetch_ahead(const T* x, const float* s, int64_t i, int64_t n) {
  const int64_t a = i + kPrefetch;
  if (a < n) {
    __builtin_prefetch(x + a, 0, 3);
    if constexpr (M != kQuantPlain) __builtin_prefetch(s + a, 0, 3);
  }
}

inline vf vabs(vf v) {
  vi b;
  std::memcpy(&b, &v, sizeof(b));
  b &= 0x7fffffff;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// Round half to even for |v| < 2^22 (always true here: |v| <= qmax + 1): adding and removing
// 1.5 * 2^23 leaves exactly the integer the default rounding mode picks, like nearbyint.
constexpr float kRoundMagic = 12582912.0f;
inline vf vround(vf v) { return (v + kRoundMagic) - kRoundMagic; }
inline float sround(float v) { return (v + kRoundMagic) - kRoundMagic; }

inline vu vmix32(vu x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Quantises W elements: writes their codes as int32 lanes and returns them as floats (+0.0
// for zero, so the EF state matches the reference, which recomputes from the integer code).
template <bool Stochastic>
inline vf quant_vec(vf p, float inv, float qmax, uint32_t index_lo, uint32_t k0, uint32_t kh) {
  const vf v = p * inv;
  vf r;
  if constexpr (Stochastic) {
    const vu lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const vu idx = (lane + index_lo) + k0;
    const vu h = vmix32(vmix32(idx) ^ kh);
    const vf u = __builtin_convertvector((vi)(h >> 8), vf) * (1.0f / 16777216.0f);
    const vf w = v + u;
    const vf rw = vround(w);
    r = rw > w ? rw - 1.0f : rw;  // floor(w)
  } else {
    r = vround(v);
  }
  r = r < -qmax ? splat(-qmax) : r;
  r = r > qmax ? splat(qmax) : r;
  return r + 0.0f;
}

template <int Bits, bool NT>
inline void store_codes(vf r, uint8_t* out) {
  const vi qi = __builtin_convertvector(r, vi);
  if constexpr (Bits == 8) {
    const vb b = __builtin_convertvector(qi, vb);
    put_bytes<NT, sizeof(b)>(out, &b);
  } else if constexpr (Bits == 4) {
    const vi8 lo = __builtin_shufflevector(qi, qi, 0, 2, 4, 6, 8, 10, 12, 14) & 0xF;
    const vi8 hi = __builtin_shufflevector(qi, qi, 1, 3, 5, 7, 9, 11, 13, 15) & 0xF;
    const vb8 b = __builtin_convertvector(lo | (hi << 4), vb8);
    put_bytes<NT, sizeof(b)>(out, &b);
  } else {
    const vi4 c0 = __builtin_shufflevector(qi, qi, 0, 4, 8, 12) & 0x3;
    const vi4 c1 = __builtin_shufflevector(qi, qi, 1, 5, 9, 13) & 0x3;
    const vi4 c2 = __builtin_shufflevector(qi, qi, 2, 6, 10, 14) & 0x3;
    const vi4 c3 = __builtin_shufflevector(qi, qi, 3, 7, 11, 15) & 0x3;
    const vb4 b = __builtin_convertvector(c0 | (c1 << 2) | (c2 << 4) | (c3 << 6), vb4);
    put_bytes<NT, sizeof(b)>(out, &b);
  }
}

// Tree reductions of a vector (log2(W) shuffles instead of W scalar steps).
inline float hmax(vf v) {
  v = v > __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)
          ? v
          : __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = v > __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)
          ? v
          : __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v = v > __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)
          ? v
          : __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return v[0] > v[1] ? v[0] : v[1];
}
// Non-zero (NaN) iff some lane is NaN; the summation order does not matter for that.
inline float hsum_nan(vf v) {
  v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return v[0] + v[1];
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// 16 codes starting at a multiple of 16 elements, as int32 lanes: each lane gets its byte
// (zero-extended), shifts its field to the top and back down arithmetically (sign extension).
template <int Bits>
inline __m512 unpack16(const uint8_t* src) {
  __m512i q;
  if constexpr (Bits == 8) {
    q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  } else if constexpr (Bits == 4) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
    const __m512i w = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));  // b0 b0 b1 b1 ...
    const __m512i shl = _mm512_setr_epi32(28, 24, 28, 24, 28, 24, 28, 24, 28, 24, 28, 24, 28,
                                          24, 28, 24);
    q = _mm512_srai_epi32(_mm512_sllv_epi32(w, shl), 28);
  } else {
    int32_t word;
    std::memcpy(&word, src, 4);
    const __m128i b = _mm_cvtsi32_si128(word);
    const __m128i rep = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i w = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(b, rep));
    const __m512i shl = _mm512_setr_epi32(30, 28, 26, 24, 30, 28, 26, 24, 30, 28, 26, 24, 30,
                                          28, 26, 24);
    q = _mm512_srai_epi32(_mm512_sllv_epi32(w, shl), 30);
  }
  return _mm512_cvtepi32_ps(q);
}
#endif

// 16 decoded values D(base)[j .. j + 16) of a message in the same codec (ring hops: the
// partial sum that arrived is added to this member's contribution before re-encoding).
template <int Bits>
inline vf base_vec(const uint8_t* codes, int64_t j, float scale) {
  constexpr int per = 8 / Bits;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512 d = _mm512_mul_ps(unpack16<Bits>(codes + j / per), _mm512_set1_ps(scale));
  vf v;
  std::memcpy(&v, &d, sizeof(v));
  return v;
#else
  int8_t q[W];
  unpack_tile(codes, j, W, Bits, q);
  vf v;
  for (int l = 0; l < W; ++l) v[l] = static_cast<float>(q[l]) * scale;
  return v;
#endif
}
template <int Bits>
inline float base_one(const uint8_t* codes, int64_t j, float scale) {
  int q;
  if constexpr (Bits == 8) {
    q = static_cast<int8_t>(codes[j]);
  } else {
    constexpr int per = 8 / Bits;
    const int sh = 8 - Bits - Bits * static_cast<int>(j % per);
    q = static_cast<int8_t>(static_cast<uint8_t>(codes[j / per] << sh)) >> (8 - Bits);
  }
  return static_cast<float>(q) * scale;
}

template <typename T, QuantMode M, bool Stochastic, int Bits, bool NT>
int64_t quantize_impl(const T* x, const float* s, float* s_out, int64_t n, uint8_t* codes,
                      float* scales, const QuantParams& qp) {
  constexpr int bits = Bits;
  constexpr int per = 8 / Bits;
  const int64_t B = qp.block;
  const float qmax = static_cast<float>(qmax_of_bits(bits));
  const int64_t nblocks = (n + B - 1) / B;
  const int nt = n >= kParallelGrain ? std::max(1, qp.nthreads) : 1;
  int64_t bad_blocks = 0;

#pragma omp parallel for schedule(static) num_threads(nt) reduction(+ : bad_blocks) if (nt > 1)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * B;
    const int64_t len = std::min(B, n - start);
    const int64_t vlen = len - len % W;  // vector part; the scalar tail is < W elements
    // p = (x + D(base)) (+/- s): a ring hop adds the message that arrived (same codec and
    // blocks) to its contribution in the same pass, as acc = x + D(msg) then p = acc + s.
    const uint8_t* bc = qp.base_codes;
    const float bscale = bc != nullptr ? qp.base_scales[b] : 0.0f;
    const auto pv = [&](int64_t i) -> vf {
      if (bc == nullptr) return pre_vec<T, M>(x, s, i);
      const vf xv = load_vec<T>(x + i) + base_vec<Bits>(bc, i, bscale);
      if constexpr (M == kQuantEF) {
        return xv + load_vec<float>(s + i);
      } else if constexpr (M == kQuantEF21) {
        return xv - load_vec<float>(s + i);
      } else {
        return xv;
      }
    };
    const auto ps = [&](int64_t i) -> float {
      if (bc == nullptr) return pre<T, M>(x, s, i);
      const float xv = static_cast<float>(x[i]) + base_one<Bits>(bc, i, bscale);
      if constexpr (M == kQuantEF) {
        return xv + s[i];
      } else if constexpr (M == kQuantEF21) {
        return xv - s[i];
      } else {
        return xv;
      }
    };

    // Pass 1: absmax, and p * 0 summed (NaN iff some p is inf or nan).
    vf mx = {}, nz = {};
    for (int64_t j = 0; j < vlen; j += W) {
      prefetch_ahead<T, M>(x, s, start + j, n);
      const vf p = pv(start + j);
      const vf a = vabs(p);
      mx = a > mx ? a : mx;
      nz += p * 0.0f;
    }
    float m = hmax(mx);
    float z = hsum_nan(nz);
    for (int64_t j = vlen; j < len; ++j) {
      const float p = ps(start + j);
      const float a = std::fabs(p);
      m = m < a ? a : m;
      z += p * 0.0f;
    }

    if (z != 0.0f) {  // NaN: the block holds inf or nan
      // Nothing of this block is transmitted: codes 0, scale NaN (propagate) or 0 (the caller
      // raises). The EF state keeps the whole untransmitted value, exactly like D = 0.
      ++bad_blocks;
      scales[b] = qp.propagate ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
      std::memset(codes + start / per, 0, static_cast<size_t>((len + per - 1) / per));
      if constexpr (M == kQuantEF) {
        for (int64_t i = start; i < start + len; ++i) s_out[i] = ps(i);
      } else if constexpr (M == kQuantEF21) {
        if (s_out != s) std::memcpy(s_out + start, s + start, sizeof(float) * len);
      }
      continue;
    }

    const float scale = m / qmax;
    const float inv = m > 0.0f ? qmax / m : 0.0f;
    scales[b] = scale;

    // RNG keys; the high-index key is constant unless the block straddles a 2^32 boundary.
    const uint64_t i0 = qp.index_offset + static_cast<uint64_t>(start);
    const bool kh_const = (i0 >> 32) == ((i0 + static_cast<uint64_t>(len) - 1) >> 32);
    const uint32_t kh0 = rng_hi_key(i0, qp.k1);
    auto unit = [&](int64_t j) {
      const uint64_t gi = i0 + static_cast<uint64_t>(j);
      const uint32_t kh = kh_const ? kh0 : rng_hi_key(gi, qp.k1);
      return u32_to_unit(rng_u32(static_cast<uint32_t>(gi), qp.k0, kh));
    };

    // Pass 2 (vector part): codes and new EF state, each written once.
    uint8_t* cb = codes + start / per;
    const bool vec_rng = !Stochastic || kh_const;
    int64_t j = 0;
    if (vec_rng) {
      for (; j < vlen; j += W) {
        const int64_t i = start + j;
        const vf p = pv(i);
        const vf r = quant_vec<Stochastic>(p, inv, qmax, static_cast<uint32_t>(i0 + j), qp.k0,
                                           kh0);
        store_codes<Bits, NT>(r, cb + j / per);
        if constexpr (M == kQuantEF) {
          put_vec<NT>(s_out + i, p - r * scale);
        } else if constexpr (M == kQuantEF21) {
          put_vec<NT>(s_out + i, load_vec<float>(s + i) + r * scale);
        }
      }
    }
    // Scalar tail (and the rare 2^32-straddling stochastic block): same maths element-wise.
    int8_t q[kTile];
    for (int64_t t = j; t < len; t += kTile) {
      const int64_t tl = std::min(kTile, len - t);
      for (int64_t jj = 0; jj < tl; ++jj) {
        const int64_t i = start + t + jj;
        const float p = ps(i);
        const float v = p * inv;
        float r;
        if constexpr (Stochastic) {
          const float w = v + unit(t + jj);
          const float rw = sround(w);
          r = rw > w ? rw - 1.0f : rw;
        } else {
          r = sround(v);
        }
        r = r < -qmax ? -qmax : r;
        r = r > qmax ? qmax : r;
        r = r + 0.0f;
        q[jj] = static_cast<int8_t>(static_cast<int>(r));
        if constexpr (M == kQuantEF) {
          s_out[i] = p - r * scale;
        } else if constexpr (M == kQuantEF21) {
          s_out[i] = s[i] + r * scale;
        }
      }
      pack_tile(q, tl, bits, cb + t / per);
    }
  }
  return bad_blocks;
}

// Outputs bigger than this go around the caches (non-temporal stores).
constexpr int64_t kStreamingBytes = int64_t{8} << 20;

template <typename T, QuantMode M, bool Stochastic, int Bits>
int64_t quantize_nt(const T* x, const float* s, float* s_out, int64_t n, uint8_t* codes,
                    float* scales, const QuantParams& qp) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 64 == 0; };
  // Streaming needs every vector store 64-byte aligned: block starts must stay aligned too.
  const bool nt = n * 4 >= kStreamingBytes && qp.block % 64 == 0 && aligned(codes) &&
                  (M == kQuantPlain || aligned(s_out));
  if (nt) {
    const int64_t r = quantize_impl<T, M, Stochastic, Bits, true>(x, s, s_out, n, codes, scales, qp);
    store_fence();
    return r;
  }
  return quantize_impl<T, M, Stochastic, Bits, false>(x, s, s_out, n, codes, scales, qp);
}

template <typename T, QuantMode M>
int64_t quantize_mode(const T* x, const float* s, float* s_out, int64_t n, uint8_t* codes,
                      float* scales, const QuantParams& qp) {
  if (qp.stochastic) {
    switch (qp.bits) {
      case 8:
        return quantize_nt<T, M, true, 8>(x, s, s_out, n, codes, scales, qp);
      case 4:
        return quantize_nt<T, M, true, 4>(x, s, s_out, n, codes, scales, qp);
      default:
        return quantize_nt<T, M, true, 2>(x, s, s_out, n, codes, scales, qp);
    }
  }
  switch (qp.bits) {
    case 8:
      return quantize_nt<T, M, false, 8>(x, s, s_out, n, codes, scales, qp);
    case 4:
      return quantize_nt<T, M, false, 4>(x, s, s_out, n, codes, scales, qp);
    default:
      return quantize_nt<T, M, false, 2>(x, s, s_out, n, codes, scales, qp);
  }
}


// out = q * scale (or out + q * scale) per block: one mul (and one add) per element, as the
// reference. AVX-512: 16 codes per step straight from the packed bytes; otherwise codes are
// unpacked in tiles and the float loop is left to the auto-vectoriser.
template <bool Acc, int Bits>
void dequantize_impl(const uint8_t* codes, const float* scales, float* out, int64_t n, int64_t B,
                     int nthreads) {
  constexpr int per = 8 / Bits;
  const int64_t nblocks = (n + B - 1) / B;
  const int nt = n >= kParallelGrain ? std::max(1, nthreads) : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * B;
    const int64_t len = std::min(B, n - start);
    const float scale = scales[b];
    float* o = out + start;
    int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const uint8_t* cb = codes + start / per;
    const __m512 sv = _mm512_set1_ps(scale);
    for (; j + 16 <= len; j += 16) {
      const __m512 d = _mm512_mul_ps(unpack16<Bits>(cb + j / per), sv);
      if constexpr (Acc) {
        _mm512_storeu_ps(o + j, _mm512_add_ps(_mm512_loadu_ps(o + j), d));
      } else {
        _mm512_storeu_ps(o + j, d);
      }
    }
#endif
    int8_t q[kTile];
    for (int64_t t = j; t < len; t += kTile) {
      const int64_t tl = std::min(kTile, len - t);
      unpack_tile(codes, start + t, tl, Bits, q);
      float* ot = o + t;
      for (int64_t jj = 0; jj < tl; ++jj) {
        const float d = static_cast<float>(q[jj]) * scale;
        if constexpr (Acc) {
          ot[jj] = ot[jj] + d;
        } else {
          ot[jj] = d;
        }
      }
    }
  }
}

template <bool Acc>
void dequantize_bits(const uint8_t* codes, const float* scales, float* out, int64_t n, int bits,
                     int64_t B, int nthreads) {
  switch (bits) {
    case 8:
      return dequantize_impl<Acc, 8>(codes, scales, out, n, B, nthreads);
    case 4:
      return dequantize_impl<Acc, 4>(codes, scales, out, n, B, nthreads);
    default:
      return dequantize_impl<Acc, 2>(codes, scales, out, n, B, nthreads);
  }
}

// ---- casts: the wire format of Identity (fp32) and BF16 summed natively by the transport ----
// fp32 -> bf16 round to nearest even as c10::BFloat16, NaN -> 0x7fc0; 16 lanes at a time.
inline void store_bf16(c10::BFloat16* w, vf p) {
  typedef uint16_t vh __attribute__((vector_size(W * 2)));
  vu u;
  std::memcpy(&u, &p, sizeof(u));
  vu r = (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
  const vi nan = p != p;
  r = (vu)((vi)r & ~nan) | ((vu)nan & 0x7fc0u);
  const vh h = __builtin_convertvector(r, vh);
  std::memcpy(w, &h, sizeof(h));
}
inline void store_wire(float* w, vf p) { store_vec(w, p); }
inline void store_wire(c10::BFloat16* w, vf p) { store_bf16(w, p); }
inline c10::Half to_half(float p) {
  c10::Half h = static_cast<c10::Half>(p);
  if (std::isnan(p)) h.x = 0x7e00;
  return h;
}
inline void store_wire(c10::Half* w, vf p) {
  for (int l = 0; l < W; ++l) w[l] = to_half(p[l]);
}
inline float wire_float(float v) { return v; }
inline float wire_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float wire_float(c10::Half v) { return static_cast<float>(v); }
inline float to_wire_scalar(float p, float*) { return p; }
inline c10::BFloat16 to_wire_scalar(float p, c10::BFloat16*) {
  uint32_t u;
  std::memcpy(&u, &p, sizeof(u));
  c10::BFloat16 b;
  b.x = std::isnan(p) ? uint16_t{0x7fc0}
                      : static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7fffu)) >> 16);
  return b;
}
inline c10::Half to_wire_scalar(float p, c10::Half*) { return to_half(p); }
// err of a non-finite p: the canonical quiet NaN (its payload would depend on the instruction).
constexpr uint32_t kCanonicalNaN = 0x7fc00000u;
inline float canonical_nan() {
  float f;
  std::memcpy(&f, &kCanonicalNaN, sizeof(f));
  return f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define LOCOCOMM_CAST_AVX512 1
template <typename T>
inline __m512 ld16(const T* p);
template <>
inline __m512 ld16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
inline __m512 ld16<c10::BFloat16>(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
constexpr int kNonFiniteClass = 0x99;  // fpclass: quiet NaN | +inf | -inf | signalling NaN

template <bool NT>
inline void st16(float* p, __m512 v) {
  if constexpr (NT) {
    _mm512_stream_ps(p, v);
  } else {
    _mm512_storeu_ps(p, v);
  }
}

// The vector part (nv groups of 16) of cast_encode for fp32/bf16 inputs and wires; returns
// non-zero if some wire value is inf/nan (the caller then counts exactly).
template <typename T, typename Wt, bool NT>
int64_t cast_encode_avx512(const T* x, const float* s, float* err, Wt* wire, float* scaled,
                           float divisor, int64_t nv, int nt) {
  int64_t bad = 0;
#pragma omp parallel num_threads(nt) reduction(+ : bad) if (nt > 1)
  {
    __mmask16 anybad = 0;
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
    const __m512i nan16 = _mm512_set1_epi32(0x7fc0);
    const __m512 nan32 = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(kCanonicalNaN)));
    const __m512 dv = _mm512_set1_ps(divisor), inv = _mm512_set1_ps(1.0f / divisor);
    const bool mul = exact_reciprocal(divisor);
#pragma omp for schedule(static)
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t i = v * 16;
      __m512 p = ld16<T>(x + i);
      if (s != nullptr) p = _mm512_add_ps(p, _mm512_loadu_ps(s + i));
      if (scaled != nullptr) {  // may alias x: p is already in a register
        const __m512 q = divisor == 1.0f ? p : mul ? _mm512_mul_ps(p, inv) : _mm512_div_ps(p, dv);
        _mm512_storeu_ps(scaled + i, q);
      }
      __m512 back;
      if constexpr (std::is_same_v<Wt, float>) {
        st16<NT>(wire + i, p);
        back = p;
      } else {  // round to nearest even as c10::BFloat16, NaN -> 0x7fc0
        const __m512i u = _mm512_castps_si512(p);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, bias)), 16);
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(p, p, _CMP_UNORD_Q), nan16);
        const __m256i h = _mm512_cvtepi32_epi16(r);
        auto* dst = reinterpret_cast<__m256i*>(wire + i);
        if constexpr (NT) {
          _mm256_stream_si256(dst, h);
        } else {
          _mm256_storeu_si256(dst, h);
        }
        back = _mm512_castsi512_ps(_mm512_slli_epi32(r, 16));
      }
      if (err != nullptr) {
        const __m512 e = _mm512_sub_ps(p, back);
        st16<NT>(err + i, _mm512_mask_mov_ps(e, _mm512_fpclass_ps_mask(p, kNonFiniteClass), nan32));
      }
      anybad |= _mm512_fpclass_ps_mask(back, kNonFiniteClass);
    }
    bad += anybad != 0;
  }
  return bad;
}

template <typename Wt, bool NT>
void cast_decode_avx512(const Wt* wire, float* out, int64_t nv, float divisor, int nt) {
  const bool divide = divisor != 1.0f;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const __m512 dv = _mm512_set1_ps(divisor), inv = _mm512_set1_ps(1.0f / divisor);
    const bool mul = exact_reciprocal(divisor);
    const __m512 nan32 = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(kCanonicalNaN)));
#pragma omp for schedule(static)
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t i = v * 16;
      __m512 w = ld16<Wt>(wire + i);
      if (divide) w = mul ? _mm512_mul_ps(w, inv) : _mm512_div_ps(w, dv);
      if constexpr (!std::is_same_v<Wt, float>) {
        w = _mm512_mask_mov_ps(w, _mm512_cmp_ps_mask(w, w, _CMP_UNORD_Q), nan32);
      }
      st16<NT>(out + i, w);
    }
  }
}
#endif

// Large outputs go around the caches (streaming stores) when every vector store is aligned.
inline bool stream_ok(const void* a, const void* b, int64_t bytes) {
  const auto al = [](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 64 == 0; };
  return bytes >= (int64_t{8} << 20) && al(a) && al(b);
}

template <typename T, typename Wt>
int64_t cast_encode_impl(const T* x, const float* s, float* err, Wt* wire, float* scaled,
                         float divisor, int64_t n, int nthreads) {
  const int nt = n >= kParallelGrain ? std::max(1, nthreads) : 1;
  int64_t bad = 0;
  const int64_t nv = n / W;
#if defined(LOCOCOMM_CAST_AVX512)
  constexpr bool fast = (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) &&
                        (std::is_same_v<Wt, float> || std::is_same_v<Wt, c10::BFloat16>);
  if constexpr (fast) {
    if (stream_ok(wire, err, n * 4)) {
      bad = cast_encode_avx512<T, Wt, true>(x, s, err, wire, scaled, divisor, nv, nt);
      store_fence();
    } else {
      bad = cast_encode_avx512<T, Wt, false>(x, s, err, wire, scaled, divisor, nv, nt);
    }
  }
#else
  constexpr bool fast = false;
#endif
  if (!fast)
#pragma omp parallel num_threads(nt) reduction(+ : bad) if (nt > 1)
  {
    vf nz = {};
#pragma omp for schedule(static)
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t i = v * W;
      vf p = load_vec<T>(x + i);
      if (s != nullptr) p += load_vec<float>(s + i);
      if (scaled != nullptr) store_vec(scaled + i, divisor != 1.0f ? p / divisor : p);
      store_wire(wire + i, p);
      vf back;
      if constexpr (std::is_same_v<Wt, float>) {
        back = p;
      } else {
        back = load_vec<Wt>(wire + i);
      }
      if (err != nullptr) {
        const vf z = p * 0.0f;  // NaN exactly where p is inf or nan
        const vi bad_lane = z != z;
        vf e = p - back;
        e = (vf)(((vi)e & ~bad_lane) | (bad_lane & (vi)(vu{} + kCanonicalNaN)));
        store_vec(err + i, e);
      }
      nz += back * 0.0f;  // NaN iff the wire holds inf/nan (bad input or overflow of the cast)
    }
    for (int l = 0; l < W; ++l) bad += nz[l] != 0.0f;  // some lane saw inf/nan: count below
  }
  for (int64_t i = nv * W; i < n; ++i) {
    const float p = s != nullptr ? static_cast<float>(x[i]) + s[i] : static_cast<float>(x[i]);
    if (scaled != nullptr) scaled[i] = divisor != 1.0f ? p / divisor : p;
    wire[i] = to_wire_scalar(p, wire);
    if (err != nullptr) err[i] = std::isfinite(p) ? p - wire_float(wire[i]) : canonical_nan();
    bad += !std::isfinite(wire_float(wire[i]));
  }
  if (bad == 0) return 0;
  bad = 0;  // exact count (rare path)
  for (int64_t i = 0; i < n; ++i) bad += !std::isfinite(wire_float(wire[i]));
  return bad;
}

template <typename Wt>
void cast_decode_impl(const Wt* wire, float* out, int64_t n, float divisor, int nthreads) {
  const int nt = n >= kParallelGrain ? std::max(1, nthreads) : 1;
  const bool divide = divisor != 1.0f;
  const int64_t nv = n / W;
#if defined(LOCOCOMM_CAST_AVX512)
  constexpr bool fast = std::is_same_v<Wt, float> || std::is_same_v<Wt, c10::BFloat16>;
  if constexpr (fast) {
    if (stream_ok(out, nullptr, n * 4)) {
      cast_decode_avx512<Wt, true>(wire, out, nv, divisor, nt);
      store_fence();
    } else {
      cast_decode_avx512<Wt, false>(wire, out, nv, divisor, nt);
    }
  }
#else
  constexpr bool fast = false;
#endif
  if (!fast)
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t v = 0; v < nv; ++v) {
    const int64_t i = v * W;
    vf w = load_vec<Wt>(wire + i);
    if (divide) w = w / divisor;
    if constexpr (!std::is_same_v<Wt, float>) {  // 16-bit NaN -> the canonical fp32 NaN
      const vi nan = w != w;
      w = (vf)(((vi)w & ~nan) | (nan & (vi)(vu{} + kCanonicalNaN)));
    }
    store_vec(out + i, w);
  }
  for (int64_t i = nv * W; i < n; ++i) {
    float w = wire_float(wire[i]);
    w = divide ? w / divisor : w;
    if (!std::is_same_v<Wt, float> && std::isnan(w)) w = canonical_nan();
    out[i] = w;
  }
}

}  // namespace

template <typename T>
int64_t quantize_blocks(const T* x, const float* state, float* state_out, int64_t n,
                        uint8_t* codes, float* scales, const QuantParams& qp, QuantMode mode) {
  switch (mode) {
    case kQuantEF:
      return quantize_mode<T, kQuantEF>(x, state, state_out, n, codes, scales, qp);
    case kQuantEF21:
      return quantize_mode<T, kQuantEF21>(x, state, state_out, n, codes, scales, qp);
    default:
      return quantize_mode<T, kQuantPlain>(x, state, state_out, n, codes, scales, qp);
  }
}

void dequantize_blocks(const uint8_t* codes, const float* scales, float* out, int64_t n, int bits,
                       int64_t block, bool accumulate, int nthreads) {
  if (accumulate) {
    dequantize_bits<true>(codes, scales, out, n, bits, block, nthreads);
  } else {
    dequantize_bits<false>(codes, scales, out, n, bits, block, nthreads);
  }
}

void rng_fill(uint32_t k0, uint32_t k1, uint64_t offset, int64_t n, int64_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t gi = offset + static_cast<uint64_t>(i);
    out[i] = rng_u32(static_cast<uint32_t>(gi), k0, rng_hi_key(gi, k1));
  }
}

#define LOCOCOMM_INSTANTIATE_QUANT(T)                                                     \
  template int64_t quantize_blocks<T>(const T*, const float*, float*, int64_t, uint8_t*, \
                                      float*, const QuantParams&, QuantMode);
LOCOCOMM_INSTANTIATE_QUANT(float)
LOCOCOMM_INSTANTIATE_QUANT(c10::Half)
LOCOCOMM_INSTANTIATE_QUANT(c10::BFloat16)
#undef LOCOCOMM_INSTANTIATE_QUANT

}  // namespace lococomm

namespace lococomm {

template <typename T>
int64_t cast_encode(const T* x, const float* state, float* err, void* wire, int wire_kind,
                    float* scaled, float divisor, int64_t n, int nthreads) {
  switch (wire_kind) {
    case 0:
      return cast_encode_impl<T, float>(x, state, err, static_cast<float*>(wire), scaled, divisor,
                                        n, nthreads);
    case 1:
      return cast_encode_impl<T, c10::BFloat16>(x, state, err, static_cast<c10::BFloat16*>(wire),
                                                scaled, divisor, n, nthreads);
    default:
      return cast_encode_impl<T, c10::Half>(x, state, err, static_cast<c10::Half*>(wire), scaled,
                                            divisor, n, nthreads);
  }
}

void cast_decode(const void* wire, int wire_kind, float* out, int64_t n, float divisor,
                 int nthreads) {
  switch (wire_kind) {
    case 0:
      return cast_decode_impl(static_cast<const float*>(wire), out, n, divisor, nthreads);
    case 1:
      return cast_decode_impl(static_cast<const c10::BFloat16*>(wire), out, n, divisor, nthreads);
    default:
      return cast_decode_impl(static_cast<const c10::Half*>(wire), out, n, divisor, nthreads);
  }
}

template int64_t cast_encode<float>(const float*, const float*, float*, void*, int, float*, float,
                                    int64_t, int);
template int64_t cast_encode<c10::Half>(const c10::Half*, const float*, float*, void*, int,
                                        float*, float, int64_t, int);
template int64_t cast_encode<c10::BFloat16>(const c10::BFloat16*, const float*, float*, void*,
                                            int, float*, float, int64_t, int);

}  // namespace lococomm

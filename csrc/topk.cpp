// Exact top-k by magnitude, fused with the error-feedback residual: p = x (+ s), select the k
// entries of largest |p| (ties -> lower index), write values and ascending indices, and the new
// residual s_out = p with the selected entries zeroed. Reference: ops/reference.py topk_select.
//
// Global: a two-level radix select on the bit pattern of |p| (for non-negative floats the
// uint32 pattern orders like the value): a 2^16-bin histogram of the high half, then of the
// low half inside the threshold bucket, gives the exact k-th magnitude T and how many ties at T
// to take. Per-thread histograms over static ranges also give each range's output offset, so a
// third pass writes every selected entry once, in index order, with no sort.
// Chunked: each chunk (<= 65536 elements, hot in L2) uses nth_element with the same total order
// on packed 64-bit keys.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include <omp.h>

#include "kernels.h"

namespace lococomm {
namespace {

constexpr uint32_t kNonFinite = 0x7f800000u;  // |p| bits >= this: inf or nan
constexpr int kBins = 1 << 16;

inline uint32_t mag_bits(float p) {
  uint32_t u;
  std::memcpy(&u, &p, sizeof(u));
  return u & 0x7fffffffu;
}

template <typename T>
inline float pre(const T* x, const float* s, int64_t i) {
  const float xv = static_cast<float>(x[i]);
  return s != nullptr ? xv + s[i] : xv;
}

// Finds the bucket holding the k-th largest key of a histogram; returns (bucket, count above).
inline void find_bucket(const std::vector<int64_t>& hist, int64_t k, int* bucket,
                        int64_t* above) {
  int64_t cum = 0;
  for (int b = kBins - 1; b >= 0; --b) {
    if (cum + hist[b] >= k) {
      *bucket = b;
      *above = cum;
      return;
    }
    cum += hist[b];
  }
  *bucket = 0;
  *above = cum;
}

}  // namespace

template <typename T>
int64_t topk_global(const T* x, const float* s, float* s_out, int64_t n, int64_t k,
                    float* values, int32_t* indices, int nthreads) {
  if (n == 0 || k <= 0) return 0;
  k = std::min(k, n);
  const int nt = n >= kParallelGrain ? std::max(1, nthreads) : 1;
  // After pass 1 the magnitudes are read back from s_out (EF) or recomputed from x.
  const bool ef = s != nullptr;
  std::vector<uint32_t> hist1(static_cast<size_t>(nt) * kBins, 0);
  std::vector<uint32_t> hist2(static_cast<size_t>(nt) * kBins, 0);
  std::vector<int64_t> nonfinite(nt, 0), gt(nt, 0), eq(nt, 0);
  auto range = [&](int t, int64_t* lo, int64_t* hi) {
    *lo = n * t / nt;
    *hi = n * (t + 1) / nt;
  };
  auto value_at = [&](int64_t i) -> float { return ef ? s_out[i] : pre<T>(x, nullptr, i); };

  // Pass 1: p (written to s_out under EF), histogram of the high 16 bits, non-finite count.
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = nt > 1 ? omp_get_thread_num() : 0;
    int64_t lo, hi;
    range(t, &lo, &hi);
    uint32_t* h = hist1.data() + static_cast<size_t>(t) * kBins;
    int64_t bad = 0;
    for (int64_t i = lo; i < hi; ++i) {
      const float p = pre<T>(x, s, i);
      if (ef) s_out[i] = p;
      const uint32_t key = mag_bits(p);
      bad += key >= kNonFinite;
      ++h[key >> 16];
    }
    nonfinite[t] = bad;
  }
  const int64_t bad_total = std::accumulate(nonfinite.begin(), nonfinite.end(), int64_t{0});
  if (bad_total > 0) return bad_total;

  std::vector<int64_t> total(kBins, 0);
  for (int t = 0; t < nt; ++t)
    for (int b = 0; b < kBins; ++b) total[b] += hist1[static_cast<size_t>(t) * kBins + b];
  int b1;
  int64_t above1;
  find_bucket(total, k, &b1, &above1);

  // Pass 2: histogram of the low 16 bits inside bucket b1.
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = nt > 1 ? omp_get_thread_num() : 0;
    int64_t lo, hi;
    range(t, &lo, &hi);
    uint32_t* h = hist2.data() + static_cast<size_t>(t) * kBins;
    for (int64_t i = lo; i < hi; ++i) {
      const uint32_t key = mag_bits(value_at(i));
      if ((key >> 16) == static_cast<uint32_t>(b1)) ++h[key & 0xffffu];
    }
  }
  std::fill(total.begin(), total.end(), 0);
  for (int t = 0; t < nt; ++t)
    for (int b = 0; b < kBins; ++b) total[b] += hist2[static_cast<size_t>(t) * kBins + b];
  int b2;
  int64_t above2;
  find_bucket(total, k - above1, &b2, &above2);
  const uint32_t thresh = (static_cast<uint32_t>(b1) << 16) | static_cast<uint32_t>(b2);
  const int64_t ties_needed = k - above1 - above2;

  // Per range: entries strictly above the threshold, and ties at it; ties go to lower indices.
  std::vector<int64_t> offset(nt, 0), take(nt, 0);
  int64_t pos = 0, ties_left = ties_needed;
  for (int t = 0; t < nt; ++t) {
    const uint32_t* h1 = hist1.data() + static_cast<size_t>(t) * kBins;
    const uint32_t* h2 = hist2.data() + static_cast<size_t>(t) * kBins;
    int64_t g = 0;
    for (int b = b1 + 1; b < kBins; ++b) g += h1[b];
    for (int b = b2 + 1; b < kBins; ++b) g += h2[b];
    gt[t] = g;
    eq[t] = h2[b2];
    take[t] = std::min(eq[t], ties_left);
    ties_left -= take[t];
    offset[t] = pos;
    pos += g + take[t];
  }

  // Pass 3: write the selection in index order and zero it in the residual.
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = nt > 1 ? omp_get_thread_num() : 0;
    int64_t lo, hi;
    range(t, &lo, &hi);
    int64_t o = offset[t], ties = take[t];
    for (int64_t i = lo; i < hi; ++i) {
      const float p = value_at(i);
      const uint32_t key = mag_bits(p);
      if (key > thresh || (key == thresh && ties > 0)) {
        if (key == thresh) --ties;
        values[o] = p;
        indices[o] = static_cast<int32_t>(i);
        ++o;
        if (ef) s_out[i] = 0.0f;
      }
    }
  }
  return 0;
}

template <typename T>
int64_t topk_chunked(const T* x, const float* s, float* s_out, int64_t n, int64_t chunk,
                     int64_t k_chunk, int64_t k_last, float* values, uint16_t* indices,
                     int nthreads) {
  if (n == 0) return 0;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  const int nt = n >= kParallelGrain ? std::max(1, nthreads) : 1;
  const bool ef = s != nullptr;
  int64_t bad_total = 0;
#pragma omp parallel num_threads(nt) reduction(+ : bad_total) if (nt > 1)
  {
    std::vector<float> p(static_cast<size_t>(chunk));
    // (magnitude bits << 32) | ~index: one integer comparison gives the total order
    // "larger magnitude first, then lower index", with no indirection in nth_element.
    std::vector<uint64_t> comp(static_cast<size_t>(chunk));
    std::vector<int32_t> idx(static_cast<size_t>(chunk));
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t start = c * chunk;
      const int64_t len = std::min(chunk, n - start);
      const int64_t kc = std::min(len, c == nchunks - 1 ? k_last : k_chunk);
      int64_t bad = 0;
      for (int64_t j = 0; j < len; ++j) {
        const float v = pre<T>(x, s, start + j);
        const uint32_t key = mag_bits(v);
        p[j] = v;
        comp[j] = (static_cast<uint64_t>(key) << 32) | (0xffffffffu - static_cast<uint32_t>(j));
        bad += key >= kNonFinite;
      }
      if (ef) std::memcpy(s_out + start, p.data(), sizeof(float) * len);
      bad_total += bad;
      if (bad > 0) continue;
      if (kc < len) {
        std::nth_element(comp.begin(), comp.begin() + kc, comp.begin() + len,
                         std::greater<uint64_t>());
      }
      for (int64_t j = 0; j < kc; ++j) {
        idx[j] = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(comp[j]));
      }
      std::sort(idx.begin(), idx.begin() + kc);
      const int64_t out0 = c * k_chunk;  // every chunk but the last holds k_chunk entries
      for (int64_t j = 0; j < kc; ++j) {
        const int32_t i = idx[j];
        values[out0 + j] = p[i];
        indices[out0 + j] = static_cast<uint16_t>(i);
        if (ef) s_out[start + i] = 0.0f;
      }
    }
  }
  return bad_total;
}

#define LOCOCOMM_INSTANTIATE_TOPK(T)                                                          \
  template int64_t topk_global<T>(const T*, const float*, float*, int64_t, int64_t, float*,  \
                                  int32_t*, int);                                             \
  template int64_t topk_chunked<T>(const T*, const float*, float*, int64_t, int64_t, int64_t, \
                                   int64_t, float*, uint16_t*, int);
LOCOCOMM_INSTANTIATE_TOPK(float)
LOCOCOMM_INSTANTIATE_TOPK(c10::Half)
LOCOCOMM_INSTANTIATE_TOPK(c10::BFloat16)
#undef LOCOCOMM_INSTANTIATE_TOPK

}  // namespace lococomm

// Exact top-k by magnitude, fused with the error-feedback residual: p = x (+ s), select the k
// entries of largest |p| (ties -> lower index), write values and ascending indices, and the new
// residual s_out = p with the selected entries zeroed. Reference: ops/reference.py topk_select.
//
// Global: a two-level radix select on the bit pattern of |p| (for non-negative floats the
// uint32 pattern orders like the value): a 2^16-bin histogram of the high half, then of the
// low half inside the threshold bucket, gives the exact k-th magnitude T and how many ties at T
// to take. Per-thread histograms over static ranges also give each range's output offset, so a
// third pass writes every selected entry once, in index order, with no sort.
// Chunked: each chunk (<= 65536 elements, hot in L1/L2) is filtered by a threshold from strided
// group maxima, then the few candidates are selected exactly (see "chunked selection" below).
// SparseLoCo (chunked top-k + 2-bit values + EF residual) and the decoders of chunked sparse
// payloads (summed over members, optionally divided) live here too.
// References: ops/reference.py topk_select, topk_chunked_select, sparseloco_encode,
// chunked_sparse_sum.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include <omp.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "common.h"
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

// ---- chunked selection ------------------------------------------------------------------
//
// One chunk (<= 65536 elements, hot in L1/L2) at a time, per thread:
//  1. load pass (vectorised): p = x (+ s) into a scratch copy, and the maxima of the magnitude
//     bits over G strided groups (element j belongs to group j % G; G >= 2 k, a power of two);
//  2. t = the k-th largest of the G group maxima: every group maximum >= t is a distinct
//     element, so at least k elements have |p| >= t, and for typical data only ~1.4 k do;
//  3. compaction pass (AVX-512 compress, or branch-free scalar): indices with |p| >= t, in
//     index order;
//  4. exact selection among those candidates on packed 64-bit keys (magnitude bits << 32 |
//     ~index: one integer comparison gives "larger magnitude first, then lower index"),
//     nth_element for the k-th key K, then one pass over the candidates in index order keeps
//     those >= K -- ascending indices without a sort.
// The selected set is the unique top-k of that total order, whatever path found it (step 2 is
// skipped for chunks where k is too large a fraction of the chunk: all elements are candidates).
namespace {

constexpr int kMaxGroups = 1024;

inline int groups_for(int64_t len, int64_t k) {
  int64_t g = 16;
  while (g < 2 * k) g <<= 1;
  if (g > kMaxGroups || len < 4 * g) return 0;
  return static_cast<int>(g);
}

struct ChunkScratch {
  std::vector<float> p;
  std::vector<int32_t> cand;
  std::vector<uint64_t> comp;
  std::vector<uint32_t> gmax;
  std::vector<int32_t> sel;
  explicit ChunkScratch(int64_t chunk)
      : p(static_cast<size_t>(chunk) + 16),
        cand(static_cast<size_t>(chunk) + 16),
        comp(static_cast<size_t>(chunk)),
        gmax(kMaxGroups),
        sel(static_cast<size_t>(chunk)) {}
};

typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));

template <typename T>
inline vf load16(const T* p) {
  float tmp[16];
  for (int l = 0; l < 16; ++l) tmp[l] = static_cast<float>(p[l]);
  vf v;
  std::memcpy(&v, tmp, sizeof(v));
  return v;
}
template <>
inline vf load16<float>(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <>
inline vf load16<c10::BFloat16>(const c10::BFloat16* p) {
  typedef uint16_t vh __attribute__((vector_size(32)));
  vh h;
  std::memcpy(&h, p, sizeof(h));
  const vu bits = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// Pass 1: p = x (+ s) into `p`; group maxima of the magnitude bits into gmax[0, G) (G = 0:
// none). Returns the largest magnitude bits of the chunk (>= kNonFinite: inf or nan inside).
template <typename T>
uint32_t load_chunk(const T* x, const float* s, int64_t len, float* p, uint32_t* gmax, int G) {
  const int A = G > 0 ? G / 16 : 1;  // vector accumulators (power of two)
  vu acc[kMaxGroups / 16];
  for (int a = 0; a < A; ++a) acc[a] = vu{};
  const int64_t nv = len / 16;
  for (int64_t v = 0; v < nv; ++v) {
    vf pv = load16<T>(x + 16 * v);
    if (s != nullptr) pv += load16<float>(s + 16 * v);
    std::memcpy(p + 16 * v, &pv, sizeof(pv));
    vu k;
    std::memcpy(&k, &pv, sizeof(k));
    k &= 0x7fffffffu;
    vu& a = acc[v & (A - 1)];
    a = k > a ? k : a;
  }
  uint32_t mx = 0;
  if (G > 0) {
    for (int a = 0; a < A; ++a)
      for (int l = 0; l < 16; ++l) gmax[16 * a + l] = acc[a][l];
  } else {
    for (int l = 0; l < 16; ++l) mx = std::max(mx, acc[0][l]);
  }
  for (int64_t j = 16 * nv; j < len; ++j) {
    const float v = pre<T>(x, s, j);
    p[j] = v;
    const uint32_t k = mag_bits(v);
    if (G > 0) {
      uint32_t& g = gmax[j & (G - 1)];
      g = std::max(g, k);
    } else {
      mx = std::max(mx, k);
    }
  }
  if (G > 0)
    for (int g = 0; g < G; ++g) mx = std::max(mx, gmax[g]);
  return mx;
}

// Indices j in [0, len) with mag_bits(p[j]) >= t, ascending, into cand (len + 16 slots).
inline int64_t compact_ge(const float* p, int64_t len, uint32_t t, int32_t* cand) {
  int64_t c = 0, j = 0;
#if defined(__AVX512F__)
  const __m512i tv = _mm512_set1_epi32(static_cast<int>(t));
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + 16 <= len; j += 16) {
    const __m512i k = _mm512_and_si512(_mm512_loadu_si512(p + j), absmask);
    const __mmask16 m = _mm512_cmpge_epu32_mask(k, tv);
    _mm512_storeu_si512(cand + c, _mm512_maskz_compress_epi32(m, idx));
    c += __builtin_popcount(static_cast<unsigned>(m));
    idx = _mm512_add_epi32(idx, step);
  }
#endif
  for (; j < len; ++j) {
    cand[c] = static_cast<int32_t>(j);
    c += mag_bits(p[j]) >= t;
  }
  return c;
}

inline uint64_t order_key(const float* p, int32_t j) {
  return (static_cast<uint64_t>(mag_bits(p[j])) << 32) |
         (0xffffffffu - static_cast<uint32_t>(j));
}

// The k largest of p[0, len) (k < len) in the order above, ascending indices into sel.
inline void select_chunk(const float* p, int64_t len, int64_t k, int G, ChunkScratch& sc,
                         int32_t* sel) {
  int32_t* cand = sc.cand.data();
  int64_t c;
  if (G > 0) {
    uint32_t* g = sc.gmax.data();
    std::nth_element(g, g + (k - 1), g + G, std::greater<uint32_t>());
    c = compact_ge(p, len, g[k - 1], cand);
  } else {
    for (int64_t j = 0; j < len; ++j) cand[j] = static_cast<int32_t>(j);
    c = len;
  }
  if (c == k) {
    std::memcpy(sel, cand, sizeof(int32_t) * static_cast<size_t>(k));
    return;
  }
  uint64_t* comp = sc.comp.data();
  for (int64_t i = 0; i < c; ++i) comp[i] = order_key(p, cand[i]);
  std::nth_element(comp, comp + (k - 1), comp + c, std::greater<uint64_t>());
  const uint64_t kth = comp[k - 1];
  int64_t o = 0;
  for (int64_t i = 0; i < c; ++i) {
    const int32_t j = cand[i];
    if (order_key(p, j) >= kth) sel[o++] = j;
  }
}

// Loads chunk [start, start + len) into sc.p and selects its kc largest into sc.sel (ascending).
// Returns the number of non-finite entries (then nothing is selected).
template <typename T>
int64_t chunk_topk(const T* x, const float* s, int64_t start, int64_t len, int64_t kc,
                   ChunkScratch& sc) {
  const int G = kc < len ? groups_for(len, kc) : 0;
  float* p = sc.p.data();
  const uint32_t mx = load_chunk<T>(x + start, s != nullptr ? s + start : nullptr, len, p,
                                    sc.gmax.data(), G);
  if (mx >= kNonFinite) {
    int64_t bad = 0;
    for (int64_t j = 0; j < len; ++j) bad += mag_bits(p[j]) >= kNonFinite;
    return bad;
  }
  if (kc >= len) {
    for (int64_t j = 0; j < len; ++j) sc.sel[j] = static_cast<int32_t>(j);
  } else {
    select_chunk(p, len, kc, G, sc, sc.sel.data());
  }
  return 0;
}

// Under EF with a non-finite input the residual is p everywhere (as in the reference).
template <typename T>
void residual_is_p(const T* x, const float* s, float* s_out, int64_t n, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t i = 0; i < n; ++i) s_out[i] = pre<T>(x, s, i);
}

}  // namespace

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
    ChunkScratch sc(chunk);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t start = c * chunk;
      const int64_t len = std::min(chunk, n - start);
      const int64_t kc = std::min(len, c == nchunks - 1 ? k_last : k_chunk);
      const int64_t bad = chunk_topk<T>(x, s, start, len, kc, sc);
      bad_total += bad;
      if (bad > 0) continue;
      float* p = sc.p.data();
      const int64_t out0 = c * k_chunk;  // every chunk but the last holds k_chunk entries
      for (int64_t o = 0; o < kc; ++o) {
        const int32_t j = sc.sel[o];
        values[out0 + o] = p[j];
        indices[out0 + o] = static_cast<uint16_t>(j);
        p[j] = 0.0f;
      }
      if (ef) std::memcpy(s_out + start, p, sizeof(float) * static_cast<size_t>(len));
    }
  }
  if (bad_total > 0 && ef) residual_is_p<T>(x, s, s_out, n, nt);
  return bad_total;
}

template <typename T>
int64_t sparseloco_encode(const T* x, const float* s, float* s_out, int64_t n, int64_t chunk,
                          int64_t k_chunk, int64_t k_last, bool stochastic, uint32_t k0,
                          uint32_t k1, uint8_t* codes, uint16_t* indices, float* scales,
                          bool bf16_scales, int nthreads) {
  if (n == 0) return 0;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  const int64_t last_len = n - (nchunks - 1) * chunk;
  const int64_t total = (nchunks - 1) * k_chunk + std::min(k_last, last_len);
  const int nt = n >= kParallelGrain ? std::max(1, nthreads) : 1;
  const bool ef = s != nullptr;
  std::vector<uint8_t> code(static_cast<size_t>(total) + 3, 0);
  int64_t bad_total = 0;
#pragma omp parallel num_threads(nt) reduction(+ : bad_total) if (nt > 1)
  {
    ChunkScratch sc(chunk);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t start = c * chunk;
      const int64_t len = std::min(chunk, n - start);
      const int64_t kc = std::min(len, c == nchunks - 1 ? k_last : k_chunk);
      const int64_t bad = chunk_topk<T>(x, s, start, len, kc, sc);
      bad_total += bad;
      if (bad > 0) continue;
      float* p = sc.p.data();
      const int32_t* sel = sc.sel.data();
      // Two magnitude levels: lo = min |v|, hi = max |v| over the kept entries.
      float lo = std::fabs(p[sel[0]]), hi = lo;
      for (int64_t o = 1; o < kc; ++o) {
        const float a = std::fabs(p[sel[o]]);
        lo = a < lo ? a : lo;
        hi = a > hi ? a : hi;
      }
      if (bf16_scales) {  // the levels the wire carries (round to nearest even), so the
        lo = static_cast<float>(c10::BFloat16(lo));  // residual is exact against them
        hi = static_cast<float>(c10::BFloat16(hi));
      }
      const float span = hi - lo;
      const int64_t out0 = c * k_chunk;
      for (int64_t o = 0; o < kc; ++o) {
        const int32_t j = sel[o];
        const float v = p[j];
        const float a = std::fabs(v);
        const float t = span > 0.0f ? (a - lo) / span : 0.0f;
        bool level;
        if (stochastic) {
          const uint64_t pos = static_cast<uint64_t>(out0 + o);
          const float u = u32_to_unit(rng_u32(static_cast<uint32_t>(pos), k0, rng_hi_key(pos, k1)));
          level = u < t;
        } else {
          level = t >= 0.5f;
        }
        const bool neg = v < 0.0f;
        code[out0 + o] = static_cast<uint8_t>((neg ? 1 : 0) | (level ? 2 : 0));
        indices[out0 + o] = static_cast<uint16_t>(j);
        const float mag = level ? hi : lo;
        p[j] = v - (neg ? -mag : mag);  // residual p - D(C(p)) of a kept entry
      }
      scales[2 * c] = lo;
      scales[2 * c + 1] = hi;
      if (ef) std::memcpy(s_out + start, p, sizeof(float) * static_cast<size_t>(len));
    }
  }
  if (bad_total > 0) {
    if (ef) residual_is_p<T>(x, s, s_out, n, nt);
    return bad_total;
  }
  const int64_t nbytes = (total + 3) / 4;
  for (int64_t b = 0; b < nbytes; ++b) {
    const uint8_t* q = code.data() + 4 * b;
    codes[b] = static_cast<uint8_t>(q[0] | (q[1] << 2) | (q[2] << 4) | (q[3] << 6));
  }
  return 0;
}

void chunked_sparse_sum(float* out, int64_t n, int64_t chunk, int64_t k_chunk, int64_t k_last,
                        const SparsePayload* payloads, int count, bool accumulate,
                        float divisor, int nthreads) {
  if (n == 0) return;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  const int nt = n >= kParallelGrain ? std::max(1, nthreads) : 1;
  const bool divide = divisor != 1.0f;
  // Without accumulation each chunk is built in an L1 scratch and written once (streaming
  // stores when aligned), instead of zeroing, scattering into and dividing the output in turn.
  const bool stream = !accumulate && chunk % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(out) % 64 == 0 && n * 4 >= (int64_t{8} << 20);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> scratch(accumulate ? 0 : static_cast<size_t>(chunk) + 16);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t start = c * chunk;
      const int64_t len = std::min(chunk, n - start);
      const int64_t kc = std::min(len, c == nchunks - 1 ? k_last : k_chunk);
      const int64_t out0 = c * k_chunk;
      float* acc = accumulate ? out + start : scratch.data();
      if (!accumulate) std::memset(acc, 0, sizeof(float) * static_cast<size_t>(len));
      for (int r = 0; r < count; ++r) {
        const SparsePayload& pl = payloads[r];
        const uint16_t* ix = pl.indices + out0;
        if (pl.values != nullptr) {
          const float* v = pl.values + out0;
          for (int64_t o = 0; o < kc; ++o) acc[ix[o]] = acc[ix[o]] + v[o];
        } else {
          const float lo = pl.scales[2 * c], hi = pl.scales[2 * c + 1];
          for (int64_t o = 0; o < kc; ++o) {
            const int64_t pos = out0 + o;
            const int code = (pl.codes[pos >> 2] >> (2 * (pos & 3))) & 3;
            const float mag = (code & 2) ? hi : lo;
            acc[ix[o]] = acc[ix[o]] + ((code & 1) ? -mag : mag);
          }
        }
      }
      float* dst = out + start;
      if (stream && len == chunk) {
#if defined(__AVX512F__)
        const __m512 dv = _mm512_set1_ps(divisor), inv = _mm512_set1_ps(1.0f / divisor);
        const bool mul = exact_reciprocal(divisor);
        for (int64_t j = 0; j < len; j += 16) {
          __m512 v = _mm512_loadu_ps(acc + j);
          if (divide) v = mul ? _mm512_mul_ps(v, inv) : _mm512_div_ps(v, dv);
          _mm512_stream_ps(dst + j, v);
        }
        continue;
#endif
      }
      if (divide) {
        for (int64_t j = 0; j < len; ++j) dst[j] = acc[j] / divisor;
      } else if (!accumulate) {
        std::memcpy(dst, acc, sizeof(float) * static_cast<size_t>(len));
      }
    }
  }
#if defined(__AVX512F__)
  if (stream) _mm_sfence();
#endif
}

#define LOCOCOMM_INSTANTIATE_TOPK(T)                                                          \
  template int64_t topk_global<T>(const T*, const float*, float*, int64_t, int64_t, float*,  \
                                  int32_t*, int);                                             \
  template int64_t topk_chunked<T>(const T*, const float*, float*, int64_t, int64_t, int64_t, \
                                   int64_t, float*, uint16_t*, int);              \
  template int64_t sparseloco_encode<T>(const T*, const float*, float*, int64_t, int64_t,      \
                                        int64_t, int64_t, bool, uint32_t, uint32_t, uint8_t*,  \
                                        uint16_t*, float*, bool, int);
LOCOCOMM_INSTANTIATE_TOPK(float)
LOCOCOMM_INSTANTIATE_TOPK(c10::Half)
LOCOCOMM_INSTANTIATE_TOPK(c10::BFloat16)
#undef LOCOCOMM_INSTANTIATE_TOPK

}  // namespace lococomm

// DiLoCo outer-step kernels: the pseudo-gradient (snapshot - local) and the SGD-Nesterov outer
// update fused with the pseudo-gradient (from a summed pseudo-gradient, or straight from the
// averaged parameters) and with the copy back into the local parameters. One read of each
// input and one write of each output per element. Also the PowerSGD decode P Q^T (fixed-order
// sum of outer products).
// Reference: ops/reference.py nesterov_outer_ / pseudo_gradient.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "kernels.h"

namespace lococomm {

template <typename T, bool FromAverage>
void nesterov_impl(float* snapshot, float* momentum, const float* delta, T* local, int64_t n,
                   float lr, float mu, float delta_scale, bool nesterov, int nthreads) {
  const int nt = n >= kParallelGrain ? std::max(1, nthreads) : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t i = 0; i < n; ++i) {
    const float d = FromAverage ? (snapshot[i] - delta[i]) * delta_scale : delta[i] * delta_scale;
    const float m = mu * momentum[i] + d;
    const float u = nesterov ? d + mu * m : m;
    const float w = snapshot[i] - lr * u;
    momentum[i] = m;
    snapshot[i] = w;
    if (local != nullptr) local[i] = static_cast<T>(w);
  }
}

template <typename T>
void nesterov_outer(float* snapshot, float* momentum, const float* delta, T* local, int64_t n,
                    float lr, float mu, float delta_scale, bool nesterov, bool from_average,
                    int nthreads) {
  if (from_average) {
    nesterov_impl<T, true>(snapshot, momentum, delta, local, n, lr, mu, delta_scale, nesterov,
                           nthreads);
  } else {
    nesterov_impl<T, false>(snapshot, momentum, delta, local, n, lr, mu, delta_scale, nesterov,
                            nthreads);
  }
}

template <typename T>
void pseudo_gradient(const float* snapshot, const T* local, float* out, int64_t n, int nthreads) {
  const int nt = n >= kParallelGrain ? std::max(1, nthreads) : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t i = 0; i < n; ++i) out[i] = snapshot[i] - static_cast<float>(local[i]);
}

// PowerSGD decode: out (m x n) = P Q^T as a fixed-order sum of outer products,
//   out[i][j] = (((p[i][0] q[j][0]) + p[i][1] q[j][1]) + ...)   (one rounding per mul and add)
// Q is transposed once (r x n, in cache); each row of out is built in an L1 scratch, r passes,
// then written once (streaming stores when aligned and large: no read of the output).
void lowrank_product(const float* p, const float* q, float* out, int64_t m, int64_t n, int64_t r,
                     int nthreads) {
  if (m == 0 || n == 0) return;
  std::vector<float> qt(static_cast<size_t>(r * n));
  for (int64_t j = 0; j < n; ++j)
    for (int64_t k = 0; k < r; ++k) qt[k * n + j] = q[j * r + k];
  const int nt = m * n >= kParallelGrain ? std::max(1, nthreads) : 1;
  const bool stream = n % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0 &&
                      m * n * 4 >= (int64_t{8} << 20);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> row(static_cast<size_t>(n));
    float* acc = row.data();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      const float* pi = p + i * r;
      float* o = stream ? acc : out + i * n;
      const float p0 = pi[0];
      const float* q0 = qt.data();
      for (int64_t j = 0; j < n; ++j) o[j] = p0 * q0[j];
      for (int64_t k = 1; k < r; ++k) {
        const float pk = pi[k];
        const float* qk = qt.data() + k * n;
        for (int64_t j = 0; j < n; ++j) o[j] = o[j] + pk * qk[j];
      }
      if (stream) {
#if defined(__AVX512F__)
        float* dst = out + i * n;
        for (int64_t j = 0; j < n; j += 16) _mm512_stream_ps(dst + j, _mm512_loadu_ps(acc + j));
#else
        std::memcpy(out + i * n, acc, sizeof(float) * static_cast<size_t>(n));
#endif
      }
    }
  }
#if defined(__AVX512F__)
  if (stream) _mm_sfence();
#endif
}

#define LOCOCOMM_INSTANTIATE_OUTER(T)                                                      \
  template void nesterov_outer<T>(float*, float*, const float*, T*, int64_t, float, float, \
                                  float, bool, bool, int);                                 \
  template void pseudo_gradient<T>(const float*, const T*, float*, int64_t, int);
LOCOCOMM_INSTANTIATE_OUTER(float)
LOCOCOMM_INSTANTIATE_OUTER(c10::Half)
LOCOCOMM_INSTANTIATE_OUTER(c10::BFloat16)
#undef LOCOCOMM_INSTANTIATE_OUTER

}  // namespace lococomm

namespace lococomm {

namespace {

inline uint64_t checksum_key(int64_t word) {  // key of the word at 0-based index `word`
  return ((static_cast<uint64_t>(word + 1) * kChecksumMul) ^ kChecksumXor) | 1ULL;
}

// One pass over `nwords` whole words of `data`, the first at word index `first_word` of the
// hashed buffer: sum_i w_i * key_{first_word + i}. With kCopy every word is also stored to `dst`
// (healing copies a staged chunk into place while hashing it: the bytes are read once).
template <bool kCopy>
uint64_t words_pass(const uint8_t* data, uint8_t* dst, int64_t nwords, int64_t first_word) {
  // Four independent accumulators: the multiplies pipeline (and vectorise) instead of waiting
  // on one sum; unsigned arithmetic wraps mod 2^64 by definition.
  uint64_t acc[4] = {0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 4 <= nwords; i += 4) {
    for (int l = 0; l < 4; ++l) {
      uint64_t w;
      std::memcpy(&w, data + 8 * (i + l), 8);  // unaligned-safe load
      if constexpr (kCopy) std::memcpy(dst + 8 * (i + l), &w, 8);
      acc[l] += w * checksum_key(first_word + i + l);
    }
  }
  uint64_t h = acc[0] + acc[1] + acc[2] + acc[3];
  for (; i < nwords; ++i) {
    uint64_t w;
    std::memcpy(&w, data + 8 * i, 8);
    if constexpr (kCopy) std::memcpy(dst + 8 * i, &w, 8);
    h += w * checksum_key(first_word + i);
  }
  return h;
}

template <bool kCopy>
uint64_t checksum_pass(const uint8_t* data, uint8_t* dst, int64_t nbytes) {
  const int64_t words = nbytes / 8;
  uint64_t h = words_pass<kCopy>(data, dst, words, 0);
  const int64_t tail = nbytes - 8 * words;
  if (tail > 0) {
    uint64_t w = 0;
    std::memcpy(&w, data + 8 * words, static_cast<size_t>(tail));  // little-endian, zero-padded
    if constexpr (kCopy) std::memcpy(dst + 8 * words, data + 8 * words, static_cast<size_t>(tail));
    h += w * checksum_key(words);
  }
  return h + static_cast<uint64_t>(nbytes) * kChecksumLength;
}

}  // namespace

uint64_t checksum(const uint8_t* data, int64_t nbytes) {
  return checksum_pass<false>(data, nullptr, nbytes);
}

uint64_t checksum_copy(uint8_t* dst, const uint8_t* src, int64_t nbytes) {
  return checksum_pass<true>(src, dst, nbytes);
}

void ChecksumStream::update(const uint8_t* data, int64_t n) {
  bytes_ += n;
  if (carry_n_ > 0) {  // complete the word a previous piece left half-done
    const int64_t take = std::min<int64_t>(8 - carry_n_, n);
    std::memcpy(carry_ + carry_n_, data, static_cast<size_t>(take));
    carry_n_ += static_cast<int>(take);
    data += take;
    n -= take;
    if (carry_n_ < 8) return;
    uint64_t w;
    std::memcpy(&w, carry_, 8);
    acc_ += w * checksum_key(words_++);
    carry_n_ = 0;
  }
  const int64_t whole = n / 8;
  acc_ += words_pass<false>(data, nullptr, whole, words_);
  words_ += whole;
  const int64_t rest = n - 8 * whole;
  if (rest > 0) {
    std::memcpy(carry_, data + 8 * whole, static_cast<size_t>(rest));
    carry_n_ = static_cast<int>(rest);
  }
}

uint64_t ChecksumStream::value() const {
  uint64_t h = acc_;
  if (carry_n_ > 0) {
    uint64_t w = 0;
    std::memcpy(&w, carry_, static_cast<size_t>(carry_n_));  // zero-padded like checksum()
    h += w * checksum_key(words_);
  }
  return h + static_cast<uint64_t>(bytes_) * kChecksumLength;
}

}  // namespace lococomm

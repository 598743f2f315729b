// CPU kernels of lococomm on raw pointers. Tensor checks, dtype dispatch and the thread count
// (torch.get_num_threads()) live in bindings.cpp; these files only do the maths, so they compile
// without the heavy torch headers and every loop is easy to read next to its torch reference.
//
// Bit-exactness contract: each kernel performs exactly the fp32 operations of its reference in
// src/lococomm/ops/reference.py, in the same order, one IEEE rounding per operation (the build
// uses -ffp-contract=off so no FMA is formed). Block results never depend on the thread count.
#pragma once

#include <cmath>
#include <cstdint>

namespace lococomm {

// How the block quantiser treats its input.
enum QuantMode : int {
  kQuantPlain = 0,  // p = x                     (no state)
  kQuantEF = 1,     // p = x + s ; s_out = p - D(Q(p))   classic error feedback
  kQuantEF21 = 2,   // p = x - s ; s_out = s + D(Q(p))   EF21 (s is the local estimate h)
};

struct QuantParams {
  int bits = 8;               // 8, 4 or 2
  int64_t block = 256;        // elements per scale; multiple of codes_per_byte(bits)
  bool stochastic = false;    // floor(v + u) instead of round-half-even
  uint32_t k0 = 0, k1 = 0;    // RNG keys (ops.reference.rng_keys(seed))
  uint64_t index_offset = 0;  // RNG index of element 0 (lets a chunk match a slice)
  bool propagate = false;     // non-finite block -> NaN scale (else scale 0, caller raises)
  int nthreads = 1;
  // Optional message of the same codec added to x first (ring hops): x + D(base) per element,
  // base block k covering the same elements as output block k.
  const uint8_t* base_codes = nullptr;
  const float* base_scales = nullptr;
};

// Quantises n elements into `codes` (ceil(n / codes_per_byte) bytes, int8 two's complement for
// 8 bits, packed nibbles / crumbs little-end first otherwise) and one fp32 scale per block.
// `state`/`state_out` are used by the EF modes (state_out may alias state). Returns the number of
// blocks that contained inf/nan.
template <typename T>
int64_t quantize_blocks(const T* x, const float* state, float* state_out, int64_t n,
                        uint8_t* codes, float* scales, const QuantParams& qp, QuantMode mode);

// out = D(codes)  or, with accumulate, out += D(codes)  (fp32, one rounding per mul and add).
void dequantize_blocks(const uint8_t* codes, const float* scales, float* out, int64_t n, int bits,
                       int64_t block, bool accumulate, int nthreads);

// Casts (the wire of Identity = fp32 and of the cast codecs): p = x (+ state); wire = p rounded
// to the wire type (wire_kind 0 fp32, 1 bf16, 2 fp16; nearest even, bf16 NaN -> 0x7fc0); with
// err: err = p - float(wire) (canonical NaN where p is inf/nan); with scaled (fp32, may alias
// x): scaled = p / divisor (p if divisor == 1). Returns the number of non-finite wire values
// (inf/nan in p, or an overflow of the cast).
template <typename T>
int64_t cast_encode(const T* x, const float* state, float* err, void* wire, int wire_kind,
                    float* scaled, float divisor, int64_t n, int nthreads);
// out = float(wire) / divisor (no division when divisor == 1).
void cast_decode(const void* wire, int wire_kind, float* out, int64_t n, float divisor,
                 int nthreads);

// Exact top-k by magnitude with ties broken towards the lower index; indices ascending.
// With state (classic EF): p = x + s, s_out = p with the selected entries zeroed.
// Returns the number of non-finite entries of p (then nothing is selected).
template <typename T>
int64_t topk_global(const T* x, const float* state, float* state_out, int64_t n, int64_t k,
                    float* values, int32_t* indices, int nthreads);
// The same per chunk of `chunk` elements (k_chunk each, k_last for a shorter last chunk);
// indices are chunk-relative offsets stored as uint16 bit patterns.
template <typename T>
int64_t topk_chunked(const T* x, const float* state, float* state_out, int64_t n, int64_t chunk,
                     int64_t k_chunk, int64_t k_last, float* values, uint16_t* indices,
                     int nthreads);

// SparseLoCo: the chunked top-k above, then per chunk two magnitude levels lo = min |v|,
// hi = max |v| of the kept entries and a 2-bit code per kept entry (bit 0: v < 0, bit 1: level
// hi, nearest t >= 0.5 or stochastic u < t with t = (|v| - lo) / (hi - lo) (0 if hi == lo) and
// u from the RNG at the entry's position in the payload), packed 4 per byte, little end first;
// scales = (lo, hi) per chunk. With state (classic EF) s_out = p - D(C(p)).
// Returns the number of non-finite entries of p (then nothing is encoded).
template <typename T>
int64_t sparseloco_encode(const T* x, const float* state, float* state_out, int64_t n,
                          int64_t chunk, int64_t k_chunk, int64_t k_last, bool stochastic,
                          uint32_t k0, uint32_t k1, uint8_t* codes, uint16_t* indices,
                          float* scales, bool bf16_scales, int nthreads);

// One chunked sparse payload: fp32 values (TopK) or SparseLoCo codes + scales, and the uint16
// chunk offsets.
struct SparsePayload {
  const float* values = nullptr;
  const uint8_t* codes = nullptr;
  const float* scales = nullptr;
  const uint16_t* indices = nullptr;
};
// out = (0, or out with accumulate) + sum over payloads in order of their decoded entries,
// then divided by `divisor` (skipped when 1): per element one add per payload holding it, in
// payload order, and one division.
void chunked_sparse_sum(float* out, int64_t n, int64_t chunk, int64_t k_chunk, int64_t k_last,
                        const SparsePayload* payloads, int count, bool accumulate,
                        float divisor, int nthreads);

// DiLoCo outer step with SGD-Nesterov, fused with the pseudo-gradient:
//   d = delta * delta_scale, or with from_average d = (snapshot - delta) * delta_scale
//   (delta then holds the averaged parameters); m = mu * m + d; u = nesterov ? d + mu * m : m;
//   snapshot = snapshot - lr * u; local = snapshot (converted to T) if local != nullptr.
template <typename T>
void nesterov_outer(float* snapshot, float* momentum, const float* delta, T* local, int64_t n,
                    float lr, float mu, float delta_scale, bool nesterov, bool from_average,
                    int nthreads);
// out = snapshot - local (the pseudo-gradient of DiLoCo), fp32.
template <typename T>
void pseudo_gradient(const float* snapshot, const T* local, float* out, int64_t n, int nthreads);

// PowerSGD decode: out (m x n, row-major) = sum over k in order of outer(p[:, k], q[:, k]) with
// p m x r and q n x r row-major: out = p0 q0, then out = out + pk qk (no FMA).
void lowrank_product(const float* p, const float* q, float* out, int64_t m, int64_t n, int64_t r,
                     int nthreads);

// n random words of the counter-based RNG starting at index `offset` (for tests).
void rng_fill(uint32_t k0, uint32_t k1, uint64_t offset, int64_t n, int64_t* out);

// True iff x / d == x * (1 / d) for every float x: d a power of two (the reciprocal is exact,
// so both are the correctly rounded x * 2^-k). Kernels then multiply (a vector division costs
// several times a multiplication) and stay bit-identical to the references' true division.
inline bool exact_reciprocal(float d) {
  int e = 0;
  if (!(d > 0.0f) || !std::isfinite(d) || std::frexp(d, &e) != 0.5f) return false;
  const float r = 1.0f / d;
  return std::isnormal(r) && std::frexp(r, &e) == 0.5f;
}

// Elements below which kernels stay on one thread (an OpenMP fork costs a few microseconds).
constexpr int64_t kParallelGrain = 1 << 16;

// Transfer checksum of a byte buffer (healing's per-chunk integrity check): a multilinear hash
// over the buffer as little-endian 64-bit words (the last one zero-padded), all mod 2^64:
//   h = sum_i w_i * key_i + nbytes * kChecksumLength,  key_i = ((i + 1) * kChecksumMul ^ kChecksumXor) | 1
// Position-dependent (catches reordered or shifted chunks); reference: ops/reference.py checksum.
constexpr uint64_t kChecksumMul = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kChecksumXor = 0xD6E8FEB86659FD93ULL;
constexpr uint64_t kChecksumLength = 0xC2B2AE3D27D4EB4FULL;
uint64_t checksum(const uint8_t* data, int64_t nbytes);
// checksum(src) while copying src to dst (non-overlapping), in one pass over src.
uint64_t checksum_copy(uint8_t* dst, const uint8_t* src, int64_t nbytes);
// checksum() of a buffer that arrives in pieces of any length (a heal stream's chunk, hashed
// as it is sent or received): update() with each piece in order, value() at the end equals
// checksum() of the concatenation.
class ChecksumStream {
 public:
  void update(const uint8_t* data, int64_t nbytes);
  uint64_t value() const;

 private:
  uint64_t acc_ = 0;
  int64_t words_ = 0;  // whole words hashed so far
  int64_t bytes_ = 0;
  uint8_t carry_[8] = {};  // a word begun but not complete
  int carry_n_ = 0;
};

}  // namespace lococomm

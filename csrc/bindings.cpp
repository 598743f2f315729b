// Python bindings of the CPU kernels: argument checks, dtype dispatch, thread count from
// torch.get_num_threads(), GIL released while a kernel runs. The Python wrappers in
// src/lococomm/ops/kernels.py validate user input first; the checks here guard the pointers.
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "kernels.h"

namespace {

using lococomm::QuantMode;
using lococomm::QuantParams;

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_f32(const at::Tensor& t, const char* name, int64_t numel) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.numel() == numel, name, " must have ", numel, " elements, got ", t.numel());
}

const float* opt_ptr(const std::optional<at::Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value()) return nullptr;
  check_f32(*t, name, n);
  return t->data_ptr<float>();
}

float* opt_mut_ptr(const std::optional<at::Tensor>& t, const char* name, int64_t n) {
  if (!t.has_value()) return nullptr;
  check_f32(*t, name, n);
  return t->data_ptr<float>();
}

// Calls f with a typed pointer of x (float32, float16 or bfloat16).
template <typename F>
auto with_input(const at::Tensor& x, F&& f) {
  check_cpu(x, "x");
  switch (x.scalar_type()) {
    case at::kFloat:
      return f(x.data_ptr<float>());
    case at::kHalf:
      return f(x.data_ptr<c10::Half>());
    case at::kBFloat16:
      return f(x.data_ptr<c10::BFloat16>());
    default:
      TORCH_CHECK(false, "unsupported dtype ", x.scalar_type(),
                  " (expected float32, float16 or bfloat16)");
  }
}

int64_t quantize(const at::Tensor& x, const std::optional<at::Tensor>& state,
                 const std::optional<at::Tensor>& state_out, at::Tensor& codes,
                 at::Tensor& scales, int64_t bits, int64_t block, bool stochastic, int64_t k0,
                 int64_t k1, int64_t index_offset, bool propagate, int64_t mode,
                 const std::optional<at::Tensor>& base_codes,
                 const std::optional<at::Tensor>& base_scales) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "bits must be 8, 4 or 2");
  const int64_t n = x.numel();
  const int64_t per = 8 / bits;
  TORCH_CHECK(block > 0 && block % per == 0, "block must be a positive multiple of ", per);
  check_cpu(codes, "codes");
  TORCH_CHECK(codes.element_size() == 1 && codes.numel() == (n + per - 1) / per,
              "codes must hold ", (n + per - 1) / per, " bytes");
  check_f32(scales, "scales", (n + block - 1) / block);
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2");
  TORCH_CHECK(mode == 0 || (state.has_value() && state_out.has_value()),
              "EF modes need state and state_out");
  const float* s = opt_ptr(state, "state", n);
  float* so = opt_mut_ptr(state_out, "state_out", n);
  QuantParams qp;
  qp.bits = static_cast<int>(bits);
  qp.block = block;
  qp.stochastic = stochastic;
  qp.k0 = static_cast<uint32_t>(k0);
  qp.k1 = static_cast<uint32_t>(k1);
  qp.index_offset = static_cast<uint64_t>(index_offset);
  qp.propagate = propagate;
  qp.nthreads = at::get_num_threads();
  TORCH_CHECK(base_codes.has_value() == base_scales.has_value(), "base codes and scales go together");
  if (base_codes.has_value()) {
    check_cpu(*base_codes, "base_codes");
    TORCH_CHECK(base_codes->element_size() == 1 && base_codes->numel() == codes.numel(),
                "base_codes must hold ", codes.numel(), " bytes");
    check_f32(*base_scales, "base_scales", scales.numel());
    qp.base_codes = static_cast<const uint8_t*>(base_codes->data_ptr());
    qp.base_scales = base_scales->data_ptr<float>();
  }
  auto* c = static_cast<uint8_t*>(codes.data_ptr());
  float* sc = scales.data_ptr<float>();
  return with_input(x, [&](auto* xp) {
    pybind11::gil_scoped_release nogil;
    return lococomm::quantize_blocks(xp, s, so, n, c, sc, qp, static_cast<QuantMode>(mode));
  });
}

void dequantize(const at::Tensor& codes, const at::Tensor& scales, at::Tensor& out, int64_t bits,
                int64_t block, bool accumulate) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "bits must be 8, 4 or 2");
  const int64_t n = out.numel();
  const int64_t per = 8 / bits;
  TORCH_CHECK(block > 0 && block % per == 0, "block must be a positive multiple of ", per);
  check_cpu(codes, "codes");
  TORCH_CHECK(codes.element_size() == 1 && codes.numel() == (n + per - 1) / per,
              "codes must hold ", (n + per - 1) / per, " bytes");
  check_f32(scales, "scales", (n + block - 1) / block);
  check_f32(out, "out", n);
  const auto* c = static_cast<const uint8_t*>(codes.data_ptr());
  const float* sc = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int nt = at::get_num_threads();
  pybind11::gil_scoped_release nogil;
  lococomm::dequantize_blocks(c, sc, o, n, static_cast<int>(bits), block, accumulate, nt);
}

int wire_kind(const at::Tensor& wire) {
  switch (wire.scalar_type()) {
    case at::kFloat:
      return 0;
    case at::kBFloat16:
      return 1;
    case at::kHalf:
      return 2;
    default:
      TORCH_CHECK(false, "wire must be float32, bfloat16 or float16, got ", wire.scalar_type());
  }
}

int64_t cast_encode(const at::Tensor& x, const std::optional<at::Tensor>& state,
                    const std::optional<at::Tensor>& err, at::Tensor& wire,
                    const std::optional<at::Tensor>& scaled, double divisor) {
  const int64_t n = x.numel();
  check_cpu(wire, "wire");
  TORCH_CHECK(wire.numel() == n, "wire must have ", n, " elements");
  const int kind = wire_kind(wire);
  const float* s = opt_ptr(state, "state", n);
  float* e = opt_mut_ptr(err, "err", n);
  float* sc = opt_mut_ptr(scaled, "scaled", n);
  void* w = wire.data_ptr();
  const int nt = at::get_num_threads();
  const auto dv = static_cast<float>(divisor);
  return with_input(x, [&](auto* xp) {
    pybind11::gil_scoped_release nogil;
    return lococomm::cast_encode(xp, s, e, w, kind, sc, dv, n, nt);
  });
}

void cast_decode(const at::Tensor& wire, at::Tensor& out, double divisor) {
  const int64_t n = out.numel();
  check_f32(out, "out", n);
  check_cpu(wire, "wire");
  TORCH_CHECK(wire.numel() == n, "wire must have ", n, " elements");
  const int kind = wire_kind(wire);
  const void* w = wire.data_ptr();
  float* o = out.data_ptr<float>();
  const int nt = at::get_num_threads();
  pybind11::gil_scoped_release nogil;
  lococomm::cast_decode(w, kind, o, n, static_cast<float>(divisor), nt);
}

int64_t topk_global(const at::Tensor& x, const std::optional<at::Tensor>& state,
                    const std::optional<at::Tensor>& state_out, int64_t k, at::Tensor& values,
                    at::Tensor& indices) {
  const int64_t n = x.numel();
  TORCH_CHECK(k >= 0 && k <= n, "k must be in [0, numel]");
  TORCH_CHECK(state.has_value() == state_out.has_value(), "state and state_out go together");
  check_f32(values, "values", k);
  check_cpu(indices, "indices");
  TORCH_CHECK(indices.scalar_type() == at::kInt && indices.numel() == k, "indices: int32[k]");
  const float* s = opt_ptr(state, "state", n);
  float* so = opt_mut_ptr(state_out, "state_out", n);
  float* v = values.data_ptr<float>();
  int32_t* ix = indices.data_ptr<int32_t>();
  const int nt = at::get_num_threads();
  return with_input(x, [&](auto* xp) {
    pybind11::gil_scoped_release nogil;
    return lococomm::topk_global(xp, s, so, n, k, v, ix, nt);
  });
}

int64_t topk_chunked(const at::Tensor& x, const std::optional<at::Tensor>& state,
                     const std::optional<at::Tensor>& state_out, int64_t chunk, int64_t k_chunk,
                     int64_t k_last, at::Tensor& values, at::Tensor& indices) {
  const int64_t n = x.numel();
  TORCH_CHECK(chunk > 0 && chunk <= 65536, "chunk must be in [1, 65536]");
  TORCH_CHECK(k_chunk >= 1 && k_chunk <= chunk, "k_chunk must be in [1, chunk]");
  TORCH_CHECK(state.has_value() == state_out.has_value(), "state and state_out go together");
  const int64_t nchunks = (n + chunk - 1) / chunk;
  const int64_t last_len = n - (nchunks - 1) * chunk;
  const int64_t total = n == 0 ? 0 : (nchunks - 1) * k_chunk + std::min(k_last, last_len);
  check_f32(values, "values", total);
  check_cpu(indices, "indices");
  TORCH_CHECK(indices.element_size() == 2 && indices.numel() == total, "indices: 16-bit[total]");
  const float* s = opt_ptr(state, "state", n);
  float* so = opt_mut_ptr(state_out, "state_out", n);
  float* v = values.data_ptr<float>();
  auto* ix = static_cast<uint16_t*>(indices.data_ptr());
  const int nt = at::get_num_threads();
  return with_input(x, [&](auto* xp) {
    pybind11::gil_scoped_release nogil;
    return lococomm::topk_chunked(xp, s, so, n, chunk, k_chunk, k_last, v, ix, nt);
  });
}

int64_t chunked_total(int64_t n, int64_t chunk, int64_t k_chunk, int64_t k_last) {
  if (n == 0) return 0;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  return (nchunks - 1) * k_chunk + std::min(k_last, n - (nchunks - 1) * chunk);
}

void check_chunking(int64_t chunk, int64_t k_chunk, int64_t k_last) {
  TORCH_CHECK(chunk > 0 && chunk <= 65536, "chunk must be in [1, 65536]");
  TORCH_CHECK(k_chunk >= 1 && k_chunk <= chunk, "k_chunk must be in [1, chunk]");
  TORCH_CHECK(k_last >= 1, "k_last must be >= 1");
}

int64_t sparseloco_encode(const at::Tensor& x, const std::optional<at::Tensor>& state,
                          const std::optional<at::Tensor>& state_out, int64_t chunk,
                          int64_t k_chunk, int64_t k_last, bool stochastic, int64_t k0,
                          int64_t k1, at::Tensor& codes, at::Tensor& indices,
                          at::Tensor& scales, bool bf16_scales) {
  const int64_t n = x.numel();
  check_chunking(chunk, k_chunk, k_last);
  TORCH_CHECK(state.has_value() == state_out.has_value(), "state and state_out go together");
  const int64_t total = chunked_total(n, chunk, k_chunk, k_last);
  const int64_t nchunks = (n + chunk - 1) / chunk;
  check_cpu(codes, "codes");
  TORCH_CHECK(codes.element_size() == 1 && codes.numel() == (total + 3) / 4,
              "codes: uint8[(total + 3) / 4]");
  check_cpu(indices, "indices");
  TORCH_CHECK(indices.element_size() == 2 && indices.numel() == total, "indices: 16-bit[total]");
  check_f32(scales, "scales", 2 * nchunks);
  const float* s = opt_ptr(state, "state", n);
  float* so = opt_mut_ptr(state_out, "state_out", n);
  auto* c = static_cast<uint8_t*>(codes.data_ptr());
  auto* ix = static_cast<uint16_t*>(indices.data_ptr());
  float* sc = scales.data_ptr<float>();
  const int nt = at::get_num_threads();
  return with_input(x, [&](auto* xp) {
    pybind11::gil_scoped_release nogil;
    return lococomm::sparseloco_encode(xp, s, so, n, chunk, k_chunk, k_last, stochastic,
                                       static_cast<uint32_t>(k0), static_cast<uint32_t>(k1), c,
                                       ix, sc, bf16_scales, nt);
  });
}

// out (+)= sum of chunked sparse payloads (TopK values or SparseLoCo codes + scales), / divisor.
void chunked_sparse_sum(at::Tensor& out, const std::vector<at::Tensor>& values,
                        const std::vector<at::Tensor>& codes,
                        const std::vector<at::Tensor>& scales,
                        const std::vector<at::Tensor>& indices, int64_t chunk, int64_t k_chunk,
                        int64_t k_last, bool accumulate, double divisor) {
  const int64_t n = out.numel();
  check_f32(out, "out", n);
  check_chunking(chunk, k_chunk, k_last);
  const int64_t total = chunked_total(n, chunk, k_chunk, k_last);
  const int64_t nchunks = (n + chunk - 1) / chunk;
  const size_t count = indices.size();
  const bool sparseloco = values.empty();
  TORCH_CHECK(sparseloco ? (codes.size() == count && scales.size() == count)
                         : (values.size() == count && codes.empty() && scales.empty()),
              "pass values (TopK) or codes and scales (SparseLoCo) for every payload");
  std::vector<lococomm::SparsePayload> pls(count);
  for (size_t r = 0; r < count; ++r) {
    check_cpu(indices[r], "indices");
    TORCH_CHECK(indices[r].element_size() == 2 && indices[r].numel() == total,
                "indices: 16-bit[", total, "]");
    pls[r].indices = static_cast<const uint16_t*>(indices[r].data_ptr());
    if (sparseloco) {
      check_cpu(codes[r], "codes");
      TORCH_CHECK(codes[r].element_size() == 1 && codes[r].numel() == (total + 3) / 4,
                  "codes: uint8[(total + 3) / 4]");
      check_f32(scales[r], "scales", 2 * nchunks);
      pls[r].codes = static_cast<const uint8_t*>(codes[r].data_ptr());
      pls[r].scales = scales[r].data_ptr<float>();
    } else {
      check_f32(values[r], "values", total);
      pls[r].values = values[r].data_ptr<float>();
    }
  }
  float* o = out.data_ptr<float>();
  const int nt = at::get_num_threads();
  pybind11::gil_scoped_release nogil;
  lococomm::chunked_sparse_sum(o, n, chunk, k_chunk, k_last, pls.data(),
                               static_cast<int>(count), accumulate, static_cast<float>(divisor),
                               nt);
}

void nesterov_outer(at::Tensor& snapshot, at::Tensor& momentum, const at::Tensor& delta,
                    const std::optional<at::Tensor>& local, double lr, double mu,
                    double delta_scale, bool nesterov, bool from_average) {
  const int64_t n = snapshot.numel();
  check_f32(snapshot, "snapshot", n);
  check_f32(momentum, "momentum", n);
  check_f32(delta, "delta", n);
  float* w = snapshot.data_ptr<float>();
  float* m = momentum.data_ptr<float>();
  const float* d = delta.data_ptr<float>();
  const int nt = at::get_num_threads();
  const auto lr_f = static_cast<float>(lr);
  const auto mu_f = static_cast<float>(mu);
  const auto sc_f = static_cast<float>(delta_scale);
  if (!local.has_value()) {
    pybind11::gil_scoped_release nogil;
    lococomm::nesterov_outer<float>(w, m, d, nullptr, n, lr_f, mu_f, sc_f, nesterov,
                                    from_average, nt);
    return;
  }
  TORCH_CHECK(local->numel() == n, "local must have ", n, " elements");
  with_input(*local, [&](auto* lp) {
    pybind11::gil_scoped_release nogil;
    lococomm::nesterov_outer(w, m, d, lp, n, lr_f, mu_f, sc_f, nesterov, from_average, nt);
    return 0;
  });
}

void pseudo_gradient(const at::Tensor& snapshot, const at::Tensor& local, at::Tensor& out) {
  const int64_t n = snapshot.numel();
  check_f32(snapshot, "snapshot", n);
  check_f32(out, "out", n);
  TORCH_CHECK(local.numel() == n, "local must have ", n, " elements");
  const float* w = snapshot.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int nt = at::get_num_threads();
  with_input(local, [&](auto* lp) {
    pybind11::gil_scoped_release nogil;
    lococomm::pseudo_gradient(w, lp, o, n, nt);
    return 0;
  });
}

void lowrank_product(const at::Tensor& p, const at::Tensor& q, at::Tensor& out) {
  TORCH_CHECK(p.dim() == 2 && q.dim() == 2 && p.size(1) == q.size(1), "p: m x r, q: n x r");
  const int64_t m = p.size(0), n = q.size(0), r = p.size(1);
  TORCH_CHECK(r >= 1, "rank must be >= 1");
  check_f32(p, "p", m * r);
  check_f32(q, "q", n * r);
  check_f32(out, "out", m * n);
  const float* pp = p.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int nt = at::get_num_threads();
  pybind11::gil_scoped_release nogil;
  lococomm::lowrank_product(pp, qp, o, m, n, r, nt);
}

// Returned as the signed bit pattern (Python ints are unbounded; the caller masks to 64 bits).
int64_t checksum_bytes(const at::Tensor& data) {
  TORCH_CHECK(data.device().is_cpu() && data.scalar_type() == at::kByte && data.is_contiguous(),
              "checksum: data must be a contiguous uint8 CPU tensor");
  const uint8_t* p = data.data_ptr<uint8_t>();
  const int64_t n = data.numel();
  pybind11::gil_scoped_release nogil;
  return static_cast<int64_t>(lococomm::checksum(p, n));
}

int64_t checksum_copy_bytes(at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(src.device().is_cpu() && src.scalar_type() == at::kByte && src.is_contiguous(),
              "checksum_copy: src must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(dst.device().is_cpu() && dst.scalar_type() == at::kByte && dst.is_contiguous(),
              "checksum_copy: dst must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(dst.numel() == src.numel(), "checksum_copy: dst has ", dst.numel(),
              " bytes, src ", src.numel());
  const uint8_t* s = src.data_ptr<uint8_t>();
  uint8_t* d = dst.data_ptr<uint8_t>();
  const int64_t n = src.numel();
  TORCH_CHECK(d + n <= s || s + n <= d, "checksum_copy: dst and src overlap");
  pybind11::gil_scoped_release nogil;
  return static_cast<int64_t>(lococomm::checksum_copy(d, s, n));
}

at::Tensor rng(int64_t k0, int64_t k1, int64_t offset, int64_t n) {
  TORCH_CHECK(n >= 0, "n must be >= 0");
  at::Tensor out = at::empty({n}, at::kLong);
  lococomm::rng_fill(static_cast<uint32_t>(k0), static_cast<uint32_t>(k1),
                     static_cast<uint64_t>(offset), n, out.data_ptr<int64_t>());
  return out;
}

}  // namespace

// ring.cpp
std::string ring_allreduce(int64_t left_fd, int64_t right_fd, int64_t abort_fd,
                           const at::Tensor& x, at::Tensor& result, const at::Tensor& recvs,
                           const at::Tensor& sends, int64_t op, int64_t world,
                           double timeout_seconds, const at::Tensor& header,
                           at::Tensor& left_header);

// heal_stream.cpp
std::string heal_stream(const std::vector<int64_t>& fds,
                        const std::vector<std::vector<at::Tensor>>& pieces,
                        const std::vector<std::vector<int64_t>>& chunk_ends,
                        const std::vector<at::Tensor>& headers, bool sending, int64_t abort_fd,
                        double timeout_seconds);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lococomm fused CPU kernels (see src/lococomm/ops for the torch references)";
  // Bumped whenever a binding's signature or semantics change; Python refuses a mismatch.
  m.attr("ABI_VERSION") = 8;
  m.def("quantize", &quantize, "block-absmax quantise (+ EF state update)");
  m.def("dequantize", &dequantize, "block dequantise (optionally += into out)");
  m.def("cast_encode", &cast_encode, "p = x (+ state) cast to the wire dtype (+ error)");
  m.def("cast_decode", &cast_decode, "out = float(wire) / divisor");
  m.def("topk_global", &topk_global, "exact top-k by magnitude (+ EF residual)");
  m.def("topk_chunked", &topk_chunked, "per-chunk exact top-k (+ EF residual)");
  m.def("sparseloco_encode", &sparseloco_encode, "chunked top-k + 2-bit values (+ EF residual)");
  m.def("chunked_sparse_sum", &chunked_sparse_sum, "sum of chunked sparse payloads (/ divisor)");
  m.def("nesterov_outer", &nesterov_outer, "fused DiLoCo SGD-Nesterov outer step");
  m.def("pseudo_gradient", &pseudo_gradient, "out = snapshot - local");
  m.def("lowrank_product", &lowrank_product, "out = P Q^T, fixed-order outer products");
  m.def("checksum", &checksum_bytes, "multilinear 64-bit transfer checksum of a byte buffer");
  m.def("checksum_copy", &checksum_copy_bytes, "checksum of src while copying it into dst");
  m.def("ring_allreduce", &ring_allreduce, "exact ring all-reduce schedule over two TCP sockets");
  m.def("heal_stream", &heal_stream, "healing's chunked, checksummed state transfer over TCP");
  m.def("rng", &rng, "counter-based RNG words (tests)");
}

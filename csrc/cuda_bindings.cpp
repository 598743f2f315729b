// Python bindings of the CUDA kernels (built only when torch.cuda.is_available()). Same
// signatures as bindings.cpp so ops/kernels.py calls either module the same way.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>

#include "cuda/kernels_cuda.h"
#include "kernels.h"

namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_f32(const at::Tensor& t, const char* name, int64_t numel, const at::Device& dev) {
  check_cuda(t, name);
  TORCH_CHECK(t.device() == dev, name, " must be on ", dev);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.numel() == numel, name, " must have ", numel, " elements, got ", t.numel());
}

int64_t quantize(const at::Tensor& x, const std::optional<at::Tensor>& state,
                 const std::optional<at::Tensor>& state_out, at::Tensor& codes,
                 at::Tensor& scales, int64_t bits, int64_t block, bool stochastic, int64_t k0,
                 int64_t k1, int64_t index_offset, bool propagate, int64_t mode) {
  check_cuda(x, "x");
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "bits must be 8, 4 or 2");
  const int64_t n = x.numel();
  const int64_t per = 8 / bits;
  TORCH_CHECK(block > 0 && block % per == 0, "block must be a positive multiple of ", per);
  const at::Device dev = x.device();
  check_cuda(codes, "codes");
  TORCH_CHECK(codes.element_size() == 1 && codes.numel() == (n + per - 1) / per,
              "codes must hold ", (n + per - 1) / per, " bytes");
  check_f32(scales, "scales", (n + block - 1) / block, dev);
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0, 1 or 2");
  TORCH_CHECK(mode == 0 || (state.has_value() && state_out.has_value()),
              "EF modes need state and state_out");
  const float* s = nullptr;
  float* so = nullptr;
  if (state.has_value()) {
    check_f32(*state, "state", n, dev);
    s = state->data_ptr<float>();
  }
  if (state_out.has_value()) {
    check_f32(*state_out, "state_out", n, dev);
    so = state_out->data_ptr<float>();
  }
  lococomm::cuda::InputType type;
  switch (x.scalar_type()) {
    case at::kFloat:
      type = lococomm::cuda::kF32;
      break;
    case at::kHalf:
      type = lococomm::cuda::kF16;
      break;
    case at::kBFloat16:
      type = lococomm::cuda::kBF16;
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", x.scalar_type());
  }
  lococomm::QuantParams qp;
  qp.bits = static_cast<int>(bits);
  qp.block = block;
  qp.stochastic = stochastic;
  qp.k0 = static_cast<uint32_t>(k0);
  qp.k1 = static_cast<uint32_t>(k1);
  qp.index_offset = static_cast<uint64_t>(index_offset);
  qp.propagate = propagate;
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor bad = at::zeros({1}, x.options().dtype(at::kLong));
  lococomm::cuda::quantize(x.data_ptr(), type, s, so, n, static_cast<uint8_t*>(codes.data_ptr()),
                           scales.data_ptr<float>(), qp, static_cast<lococomm::QuantMode>(mode),
                           reinterpret_cast<unsigned long long*>(bad.data_ptr<int64_t>()),
                           c10::cuda::getCurrentCUDAStream().stream());
  return bad.item<int64_t>();  // synchronises: the caller must know about inf/nan now
}

void dequantize(const at::Tensor& codes, const at::Tensor& scales, at::Tensor& out, int64_t bits,
                int64_t block, bool accumulate) {
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "bits must be 8, 4 or 2");
  const int64_t n = out.numel();
  const int64_t per = 8 / bits;
  TORCH_CHECK(block > 0 && block % per == 0, "block must be a positive multiple of ", per);
  check_cuda(codes, "codes");
  const at::Device dev = codes.device();
  TORCH_CHECK(codes.element_size() == 1 && codes.numel() == (n + per - 1) / per,
              "codes must hold ", (n + per - 1) / per, " bytes");
  check_f32(scales, "scales", (n + block - 1) / block, dev);
  check_f32(out, "out", n, dev);
  const c10::cuda::CUDAGuard guard(dev);
  lococomm::cuda::dequantize(static_cast<const uint8_t*>(codes.data_ptr()),
                             scales.data_ptr<float>(), out.data_ptr<float>(), n,
                             static_cast<int>(bits), block, accumulate,
                             c10::cuda::getCurrentCUDAStream().stream());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lococomm fused CUDA kernels (see src/lococomm/ops for the torch references)";
  m.attr("ABI_VERSION") = 8;
  m.def("quantize", &quantize, "block-absmax quantise (+ EF state update), CUDA");
  m.def("dequantize", &dequantize, "block dequantise (optionally += into out), CUDA");
}

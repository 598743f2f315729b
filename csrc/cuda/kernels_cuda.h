// CUDA kernels of lococomm on raw device pointers (no torch headers, so `nvcc -c` works with
// any torch install). Tensor checks and the current stream come from csrc/cuda_bindings.cpp.
// Same maths, same bits as the CPU kernels and ops/reference.py: every fp32 operation is an
// explicit round-to-nearest intrinsic (__fmul_rn, __fadd_rn, ...), never contracted to an FMA.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels.h"

namespace lococomm {
namespace cuda {

enum InputType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Block quantiser (+ EF / EF21 state update), see kernels.h quantize_blocks. `bad` is a device
// counter (unsigned long long) incremented once per block holding inf/nan.
void quantize(const void* x, InputType type, const float* state, float* state_out, int64_t n,
              uint8_t* codes, float* scales, const QuantParams& qp, QuantMode mode,
              unsigned long long* bad, cudaStream_t stream);

// out = D(codes) or out += D(codes).
void dequantize(const uint8_t* codes, const float* scales, float* out, int64_t n, int bits,
                int64_t block, bool accumulate, cudaStream_t stream);

}  // namespace cuda
}  // namespace lococomm

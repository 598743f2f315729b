// DiLoCo outer-step kernels: the pseudo-gradient (snapshot - local) and the SGD-Nesterov outer
// update fused with the pseudo-gradient (from a summed pseudo-gradient, or straight from the
// averaged parameters) and with the copy back into the local parameters. One read of each
// input and one write of each output per element.
// Reference: ops/reference.py nesterov_outer_ / pseudo_gradient.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

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

#define LOCOCOMM_INSTANTIATE_OUTER(T)                                                      \
  template void nesterov_outer<T>(float*, float*, const float*, T*, int64_t, float, float, \
                                  float, bool, bool, int);                                 \
  template void pseudo_gradient<T>(const float*, const T*, float*, int64_t, int);
LOCOCOMM_INSTANTIATE_OUTER(float)
LOCOCOMM_INSTANTIATE_OUTER(c10::Half)
LOCOCOMM_INSTANTIATE_OUTER(c10::BFloat16)
#undef LOCOCOMM_INSTANTIATE_OUTER

}  // namespace lococomm

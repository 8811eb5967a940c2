// Layer norm over the last dimension with a weight and a bias (nn.LayerNorm's function):
//   y = (x - mean) * (1 / sqrt(var + eps)) * weight + bias, var the biased variance,
// fp32 or bf16 (computed in fp32, rounded once), each row on its own.
//
// A decode step runs two of them a block on one row: ATen's took a few microseconds each there
// (the call, its output and its mean and rstd tensors), more than the arithmetic of 768 values;
// block.cpp runs this one on its own buffers instead. So that a window's prefill and the slow
// recompute give the bits a decode step gives, a CPU model's layer norms all run it
// (fused_decode.KernelLayerNorm). Two passes, the mean and then the deviations from it (the
// corrected two-pass form), each a sum of kWidth interleaved partial sums added up in a fixed
// order: every row's values come from the same operations whatever the number of rows or
// threads, and the AVX-512, AVX2 and baseline versions the compiler makes give the same bits
// (the lanes are separate sums).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

namespace {

constexpr int kWidth = 16;

template <typename T>
inline __attribute__((always_inline)) void norm_row(const T* x, const T* weight, const T* bias, int64_t n, float eps,
                                                    T* y) {
  float part[kWidth] = {};
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth)
    for (int l = 0; l < kWidth; ++l) part[l] = part[l] + cpmgen::widen(x[i + l]);
  for (int l = 0; i < n; ++i, ++l) part[l] = part[l] + cpmgen::widen(x[i]);
  const float rough = cpmgen::lanes_sum<kWidth>(part) / static_cast<float>(n);
  // The deviations from the first pass's mean: their sum corrects the mean (the first pass's
  // rounding, large where the values sit far from 0), their squares give the variance.
  float deviations[kWidth] = {}, squares[kWidth] = {};
  for (i = 0; i + kWidth <= n; i += kWidth)
    for (int l = 0; l < kWidth; ++l) {
      const float d = cpmgen::widen(x[i + l]) - rough;
      deviations[l] = deviations[l] + d;
      squares[l] = squares[l] + d * d;
    }
  for (int l = 0; i < n; ++i, ++l) {
    const float d = cpmgen::widen(x[i]) - rough;
    deviations[l] = deviations[l] + d;
    squares[l] = squares[l] + d * d;
  }
  const float correction = cpmgen::lanes_sum<kWidth>(deviations) / static_cast<float>(n);
  const float mean = rough + correction;
  const float variance = cpmgen::lanes_sum<kWidth>(squares) / static_cast<float>(n) - correction * correction;
  const float rstd = 1.f / std::sqrt((variance > 0.f ? variance : 0.f) + eps);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j)
    y[j] = static_cast<T>((cpmgen::widen(x[j]) - mean) * rstd * cpmgen::widen(weight[j]) + cpmgen::widen(bias[j]));
}

CPMGEN_WIDE_CLONES void norm_rows(const float* x, const float* weight, const float* bias, int64_t n, float eps,
                                  float* y, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) norm_row(x + r * n, weight, bias, n, eps, y + r * n);
}

CPMGEN_WIDE_CLONES void norm_rows(const at::BFloat16* x, const at::BFloat16* weight, const at::BFloat16* bias,
                                  int64_t n, float eps, at::BFloat16* y, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) norm_row(x + r * n, weight, bias, n, eps, y + r * n);
}

}  // namespace

namespace cpmgen {

void check_layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& out) {
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && x.is_contiguous() && x.dim() >= 1,
              "layer_norm: a contiguous fp32 or bf16 input");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.scalar_type() == dtype && bias.scalar_type() == dtype && weight.is_contiguous() &&
                  bias.is_contiguous() && weight.numel() == n && bias.numel() == n,
              "layer_norm: weight and bias must be [", n, "] in the input's dtype");
  TORCH_CHECK(out.scalar_type() == dtype && out.is_contiguous() && out.numel() == x.numel(),
              "layer_norm: the output must be contiguous, of the input's size and dtype");
}

void layer_norm_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps, at::Tensor& out,
                     int64_t begin, int64_t end) {
  const int64_t n = x.size(-1);
  if (x.scalar_type() == at::kFloat) {
    norm_rows(x.data_ptr<float>() + begin * n, weight.data_ptr<float>(), bias.data_ptr<float>(), n,
              static_cast<float>(eps), out.data_ptr<float>() + begin * n, end - begin);
  } else {
    norm_rows(x.data_ptr<at::BFloat16>() + begin * n, weight.data_ptr<at::BFloat16>(), bias.data_ptr<at::BFloat16>(), n,
              static_cast<float>(eps), out.data_ptr<at::BFloat16>() + begin * n, end - begin);
  }
}

at::Tensor layer_norm(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x);
  check_layer_norm(x, weight, bias, out);
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)),
                   [&](int64_t begin, int64_t end) { layer_norm_rows(x, weight, bias, eps, out, begin, end); });
  return out;
}

}  // namespace cpmgen

TORCH_LIBRARY_FRAGMENT(cpmgen, m) {
  m.def("layer_norm(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpmgen, CPU, m) {
  m.impl("layer_norm", cpmgen::layer_norm);
}

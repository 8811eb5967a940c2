// y = x @ W^T + b for fp32 weights as nn.Linear holds them ([N, K], row-major). Up to kMaxRows
// input rows (a decode step) run here, reading W once per call; more (a window's prefill) go to
// at::linear, a matrix product that reuses each weight across the rows.
//
// Each thread takes whole groups of kGroup output rows and each output is one thread's
// fixed-order sum (8 lanes, added pairwise at the end), so the values do not depend on the thread
// count. AVX2 with FMA where the CPU has it, plain C++ elsewhere (the two round differently; a
// machine always runs the same one). A bf16 version (weights widened as read) measured no faster
// than torch's bf16 linear on an AVX2 CPU, so bf16 is not taken here.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CPMGEN_X86 1
#else
#define CPMGEN_X86 0
#endif

namespace {

constexpr int64_t kGroup = 4;    // output rows that share one pass over the input row
constexpr int64_t kMaxRows = 4;  // input rows read here at most (beyond, at::linear)

inline float pairwise(const float* t) { return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7])); }

// y[0..rows) for `rows` (1..kGroup) weight rows of length k from w and one input row x.
void rows_generic(const float* w, const float* x, int64_t k, int rows, float* y) {
  for (int r = 0; r < rows; ++r) {
    float part[8] = {};
    int64_t i = 0;
    for (; i + 8 <= k; i += 8)
      for (int l = 0; l < 8; ++l) part[l] = part[l] + w[r * k + i + l] * x[i + l];
    float s = pairwise(part);
    for (; i < k; ++i) s = s + w[r * k + i] * x[i];
    y[r] = s;
  }
}

#if CPMGEN_X86
__attribute__((target("avx2,fma"))) void rows_avx2(const float* w, const float* x, int64_t k, int rows, float* y) {
  __m256 acc[kGroup];
  for (int r = 0; r < kGroup; ++r) acc[r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    for (int r = 0; r < rows; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * k + i), xv, acc[r]);
  }
  for (int r = 0; r < rows; ++r) {
    alignas(32) float t[8];
    _mm256_store_ps(t, acc[r]);
    float s = pairwise(t);
    for (int64_t j = i; j < k; ++j) s = s + w[r * k + j] * x[j];
    y[r] = s;
  }
}
#endif

using Rows = void (*)(const float*, const float*, int64_t, int, float*);

Rows best_rows() {
#if CPMGEN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return rows_avx2;
#endif
  return rows_generic;
}

}  // namespace

namespace cpmgen {

at::Tensor gemv_linear(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && weight.dim() == 2 &&
                  weight.is_contiguous(),
              "gemv_linear: fp32 input and a contiguous fp32 [out_features, in_features] weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(input.size(-1) == k, "gemv_linear: input has ", input.size(-1), " features, the weight ", k);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n && bias->is_contiguous(),
                "gemv_linear: bias must be fp32 [out_features]");
    b = bias->data_ptr<float>();
  }
  if (input.numel() > kMaxRows * k) return at::linear(input, weight, bias);
  static const Rows rows_of = best_rows();
  const at::Tensor x = input.reshape({-1, k}).contiguous();
  const int64_t m = x.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (n + kGroup - 1) / kGroup, 16, [&](int64_t begin, int64_t end) {
    float out[kGroup];
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = g * kGroup;
      const int rows = static_cast<int>(std::min(kGroup, n - n0));
      for (int64_t row = 0; row < m; ++row) {
        rows_of(wp + n0 * k, xp + row * k, k, rows, out);
        for (int r = 0; r < rows; ++r) yp[row * n + n0 + r] = b ? out[r] + b[n0 + r] : out[r];
      }
    }
  });
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = n;
  return y.view(shape);
}

}  // namespace cpmgen

TORCH_LIBRARY_FRAGMENT(cpmgen, m) { m.def("gemv_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(cpmgen, CPU, m) { m.impl("gemv_linear", cpmgen::gemv_linear); }

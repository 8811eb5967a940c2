// GELU with the tanh approximation (the MLP's activation): 0.5 x (1 + tanh(u)) with
// u = sqrt(2/pi) (x + 0.044715 x^3), computed as x sigmoid(2u), the same function:
//   2u >= 0: x / (1 + e^-2u),   2u < 0: x e^2u / (1 + e^2u),
// so the exponent is never positive (exp_nonpositive, within 2 ulp): within 16 ulp of the exact
// function wherever it is at least 1e-3 in size (F.gelu's tanh form, where 1 + tanh(u) cancels,
// was off by over 1000 ulp below x = -5). ATen's tanh GELU ran at about 1 ns an element on one
// core here and did not split a prefill's rows over the threads; this is one pass the compiler
// vectorizes (AVX-512, AVX2 or plain versions: element by element, so the same bits in each).
//
// The MLPs of a CPU model call it through fused_decode.KernelGeluMLP, a block's one-token step
// (block.cpp) through gelu_tanh_rows: the same values either way.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "kernels.h"

namespace {

inline __attribute__((always_inline)) float gelu_tanh_one(float x) {
  const float z = 1.5957691216057308f * (x + 0.044715f * (x * x * x));  // 2u
  const float e = cpmgen::exp_nonpositive(z >= 0.f ? -z : z);
  return (z >= 0.f ? x : x * e) / (1.f + e);
}

CPMGEN_WIDE_CLONES void gelu_floats(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_tanh_one(x[i]);
}

CPMGEN_WIDE_CLONES void gelu_bf16(const at::BFloat16* x, at::BFloat16* y, int64_t n) {
  constexpr int64_t kChunk = 256;
  float wide[kChunk];
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t count = n - begin < kChunk ? n - begin : kChunk;
    for (int64_t i = 0; i < count; ++i) wide[i] = cpmgen::widen(x[begin + i]);
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) wide[i] = gelu_tanh_one(wide[i]);
    for (int64_t i = 0; i < count; ++i) y[begin + i] = static_cast<at::BFloat16>(wide[i]);
  }
}

void gelu_range(const at::Tensor& x, at::Tensor& out, int64_t begin, int64_t end) {
  if (x.scalar_type() == at::kFloat) {
    gelu_floats(x.data_ptr<float>() + begin, out.data_ptr<float>() + begin, end - begin);
  } else {
    gelu_bf16(x.data_ptr<at::BFloat16>() + begin, out.data_ptr<at::BFloat16>() + begin, end - begin);
  }
}

void check(const at::Tensor& x, const at::Tensor& out) {
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.is_contiguous(),
              "gelu_tanh_: a contiguous fp32 or bf16 input");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_contiguous() && out.numel() == x.numel(),
              "gelu_tanh_: the output must be contiguous, of the input's size and dtype");
}

}  // namespace

namespace cpmgen {

void gelu_tanh_rows(const at::Tensor& x, at::Tensor& out) {
  check(x, out);
  gelu_range(x, out, 0, x.numel());
}

// In place: a prefill's activations are a new matrix of rows x 4 hidden values, which a second
// one of the same size would take fresh pages for (page faults, and twice the bytes through the caches).
at::Tensor& gelu_tanh_(at::Tensor& x) {
  check(x, x);
  at::parallel_for(0, x.numel(), 16384, [&](int64_t begin, int64_t end) { gelu_range(x, x, begin, end); });
  return x;
}

}  // namespace cpmgen

TORCH_LIBRARY_FRAGMENT(cpmgen, m) {
  m.def("gelu_tanh_(Tensor(a!) x) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(cpmgen, CPU, m) {
  m.impl("gelu_tanh_", cpmgen::gelu_tanh_);
}

// The index of each row's greatest value, as torch.argmax(x, dim=-1) gives it (the first of
// equal greatest values; a NaN counts as greater than any number, so the first NaN where there
// is one), for the token a greedy step or a sampling race picks. ATen's CPU argmax compares one
// value at a time; over a vocabulary that was a visible part of a small model's step. Here two
// passes the compiler vectorizes: the greatest value (and whether there is a NaN), then the
// first index holding it.
//
//   x [rows, n] fp32 or bf16 (n >= 1) -> [rows] int64
//
// A bf16 row (a bf16 model's logits) is compared as its values widened to fp32, which is exact
// and keeps their order: the index torch gives for the row, and for the row converted to fp32.
//
// finite_argmax_rows: the same, or -1 for a row that holds a NaN or an infinity: a greedy step's
// check of its logits (sampling.require_finite) and its token in one pass over them.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels.h"

namespace {

constexpr int kLanes = cpmgen::kVectorFloats;  // values compared side by side: one AVX2 register of floats
using Floats = cpmgen::Floats8;
using Mask = cpmgen::Mask8;
using cpmgen::load_floats;
using cpmgen::widen;

inline __attribute__((always_inline)) bool any(Mask m) {
  int32_t lanes[kLanes];
  std::memcpy(lanes, &m, sizeof(lanes));
  int32_t a = 0;
  for (int l = 0; l < kLanes; ++l) a |= lanes[l];
  return a != 0;
}

// The first index whose value is `value` (kNan: the first NaN), a block of kLanes at a time.
template <bool kNan, typename T>
inline __attribute__((always_inline)) int64_t first_index(const T* p, int64_t n, float value) {
  auto is = [value](Floats v) -> Mask { return kNan ? v != v : v == value; };
  int64_t start = 0;
  for (; start + 4 * kLanes <= n; start += 4 * kLanes)
    if (any(is(load_floats(p + start)) | is(load_floats(p + start + kLanes)) | is(load_floats(p + start + 2 * kLanes)) |
            is(load_floats(p + start + 3 * kLanes))))
      break;
  for (int64_t j = start; j < n; ++j) {
    const float v = widen(p[j]);
    if (kNan ? v != v : v == value) return j;
  }
  return 0;  // not reached: the value is in the row
}

// The row's argmax; with kFinite, -1 instead where the row holds a NaN or an infinity (the
// least value tracked beside the greatest, for a -inf).
template <bool kFinite, typename T>
inline __attribute__((always_inline)) int64_t row_argmax_in(const T* p, int64_t n) {
  const float low = -std::numeric_limits<float>::infinity();
  // four vectors of running maxima, so that four comparisons are in flight (a maximum does not
  // depend on the order the values are taken in)
  Floats top[4], least[4];
  for (Floats& t : top) t = low - Floats{};  // every lane -inf
  for (Floats& l : least) l = -low - Floats{};  // every lane +inf
  Mask nan = {};
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes)
    for (int j = 0; j < 4; ++j) {
      const Floats v = load_floats(p + i + j * kLanes);
      top[j] = v > top[j] ? v : top[j];  // a NaN never replaces a lane's value
      if constexpr (kFinite) least[j] = v < least[j] ? v : least[j];
      nan |= v != v;
    }
  float best = low, lowest = -low;
  for (int j = 0; j < 4; ++j) {
    float lanes[kLanes], least_lanes[kLanes];
    std::memcpy(lanes, &top[j], sizeof(lanes));
    std::memcpy(least_lanes, &least[j], sizeof(least_lanes));
    for (int l = 0; l < kLanes; ++l) {
      best = lanes[l] > best ? lanes[l] : best;
      if constexpr (kFinite) lowest = least_lanes[l] < lowest ? least_lanes[l] : lowest;
    }
  }
  bool has_nan = any(nan);
  for (; i < n; ++i) {
    const float v = widen(p[i]);
    best = v > best ? v : best;
    if constexpr (kFinite) lowest = v < lowest ? v : lowest;
    has_nan = has_nan || v != v;
  }
  if constexpr (kFinite)
    if (has_nan || std::isinf(best) || std::isinf(lowest)) return -1;
  return has_nan ? first_index<true>(p, n, best) : first_index<false>(p, n, best);
}

CPMGEN_CLONES int64_t row_argmax(const float* p, int64_t n) { return row_argmax_in<false>(p, n); }
CPMGEN_CLONES int64_t row_argmax(const at::BFloat16* p, int64_t n) { return row_argmax_in<false>(p, n); }
CPMGEN_CLONES int64_t row_argmax_finite(const float* p, int64_t n) { return row_argmax_in<true>(p, n); }
CPMGEN_CLONES int64_t row_argmax_finite(const at::BFloat16* p, int64_t n) { return row_argmax_in<true>(p, n); }

template <bool kFinite, typename T>
void argmax_of_rows(const T* p, int64_t rows, int64_t n, int64_t* out) {
  for (int64_t r = 0; r < rows; ++r) out[r] = kFinite ? row_argmax_finite(p + r * n, n) : row_argmax(p + r * n, n);
}

template <bool kFinite>
at::Tensor argmax_each_row(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && x.size(1) > 0,
              op, ": x must be fp32 or bf16 [rows, n] with n >= 1");
  const at::Tensor c = x.contiguous();
  const int64_t rows = c.size(0), n = c.size(1);
  at::Tensor out = at::empty({rows}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  if (c.scalar_type() == at::kFloat) {
    argmax_of_rows<kFinite>(c.data_ptr<float>(), rows, n, o);
  } else {
    argmax_of_rows<kFinite>(c.data_ptr<at::BFloat16>(), rows, n, o);
  }
  return out;
}

at::Tensor argmax_rows(const at::Tensor& x) { return argmax_each_row<false>(x, "argmax_rows"); }

at::Tensor finite_argmax_rows(const at::Tensor& x) { return argmax_each_row<true>(x, "finite_argmax_rows"); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(cpmgen, m) {
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("finite_argmax_rows(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpmgen, CPU, m) {
  m.impl("argmax_rows", argmax_rows);
  m.impl("finite_argmax_rows", finite_argmax_rows);
}

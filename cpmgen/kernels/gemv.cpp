// y = x @ W^T + b for fp32 or bf16 weights as nn.Linear holds them ([N, K], row-major). Up to
// kGemvMaxRows input rows (a decode step) run here, reading W once per call; more (a window's
// prefill) go to a matrix product that reuses each weight across the rows: matrix_linear for fp32
// (and for bf16 weights in fp32 where the CPU has no bf16 products: see gemv_linear), at::linear
// for bf16.
//
// Each thread takes whole groups of kGroup output rows and each output is one thread's
// fixed-order sum in fp32 (8 lanes, two such sums with AVX2, added pairwise at the end), so the
// values do not depend on the thread count. Where the CPU has bf16 dot products (AVX-512 BF16),
// bf16 weights meet the bf16 input as they are: each instruction multiplies 32 pairs (every
// product exact in fp32) and adds them into 16 fp32 sums. Elsewhere bf16 weights are widened to
// fp32 as they are read (a bf16 value is the top half of an fp32 one), the input row once per
// call. Each output is rounded to bf16 once, after the bias. AVX2 with FMA where the CPU has it,
// plain C++ elsewhere. The forms round differently; a machine runs the best one it has unless
// cpmgen::gemv_use(name) picks another (tests compare them):
//   avx512bf16: bf16 weights on bf16 dot products, fp32 as avx2;
//   avx2:       fp32 and widened bf16 weights with AVX2 FMAs;
//   generic:    plain C++ loops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <string>

#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CPMGEN_X86 1
#else
#define CPMGEN_X86 0
#endif

namespace {

constexpr int64_t kGroup = 4;  // output rows a unit of work holds (threads take whole units)

inline float pairwise(const float* t) { return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7])); }

// y[0..rows) for `rows` (1..kGroup) weight rows of length k from w and one fp32 input row x.
template <typename W>
void rows_generic(const W* w, const float* x, int64_t k, int rows, float* y) {
  for (int r = 0; r < rows; ++r) {
    float part[8] = {};
    int64_t i = 0;
    for (; i + 8 <= k; i += 8)
      for (int l = 0; l < 8; ++l) part[l] = part[l] + static_cast<float>(w[r * k + i + l]) * x[i + l];
    float s = pairwise(part);
    for (; i < k; ++i) s = s + static_cast<float>(w[r * k + i]) * x[i];
    y[r] = s;
  }
}

#if CPMGEN_X86
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// A bf16 value is the top half of an fp32 one: widened to 32 bits and shifted up.
__attribute__((target("avx2,fma"))) inline __m256 load8(const at::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// One weight row after another, each read front to back: a single stream the hardware
// prefetchers follow (four rows read side by side, sharing each load of x, are four short streams
// at once, which read slower). Two accumulators, for the even and the odd 8 inputs of each 16,
// keep two FMAs in flight.
template <typename W>
__attribute__((target("avx2,fma"))) void rows_avx2(const W* w, const float* x, int64_t k, int rows, float* y) {
  for (int r = 0; r < rows; ++r) {
    const W* row = w + r * k;
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
      cpmgen::prefetch_ahead(row + i);
      even = _mm256_fmadd_ps(load8(row + i), _mm256_loadu_ps(x + i), even);
      odd = _mm256_fmadd_ps(load8(row + i + 8), _mm256_loadu_ps(x + i + 8), odd);
    }
    if (i + 8 <= k) {
      even = _mm256_fmadd_ps(load8(row + i), _mm256_loadu_ps(x + i), even);
      i += 8;
    }
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_add_ps(even, odd));
    float s = pairwise(t);
    for (; i < k; ++i) s = s + static_cast<float>(row[i]) * x[i];
    y[r] = s;
  }
}

__attribute__((target("avx512f,avx512bf16"))) inline __m512bh load32(const at::BFloat16* p) {
  return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
}

// bf16 weights and a bf16 input row: vdpbf16ps adds the products of each lane's two pairs into
// its fp32 sum (the even and the odd 32 inputs of each 64 into two sums, for two in flight), so
// the weights are never widened; the 16 lanes of the sums are added pairwise at the end.
__attribute__((target("avx512f,avx512bf16"))) void rows_bf16_products(const at::BFloat16* w, const at::BFloat16* x,
                                                                      int64_t k, int rows, float* y) {
  for (int r = 0; r < rows; ++r) {
    const at::BFloat16* row = w + r * k;
    __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) {
      cpmgen::prefetch_ahead(row + i);
      cpmgen::prefetch_ahead(row + i + 32);
      even = _mm512_dpbf16_ps(even, load32(row + i), load32(x + i));
      odd = _mm512_dpbf16_ps(odd, load32(row + i + 32), load32(x + i + 32));
    }
    if (i + 32 <= k) {
      even = _mm512_dpbf16_ps(even, load32(row + i), load32(x + i));
      i += 32;
    }
    alignas(64) float t[16];
    _mm512_store_ps(t, _mm512_add_ps(even, odd));
    float s = pairwise(t) + pairwise(t + 8);
    for (; i < k; ++i) s = s + static_cast<float>(row[i]) * static_cast<float>(x[i]);
    y[r] = s;
  }
}
#endif

template <typename W, typename X>
using Rows = void (*)(const W*, const X*, int64_t, int, float*);

// One form of the loops: for fp32 weights, for bf16 weights with an fp32 input, and whether bf16
// weights take a bf16 input on dot products instead.
struct Form {
  const char* name;
  Rows<float, float> fp32;
  Rows<at::BFloat16, float> bf16_widened;
  bool bf16_products;
};

const Form kGeneric{"generic", rows_generic<float>, rows_generic<at::BFloat16>, false};
#if CPMGEN_X86
const Form kAvx2{"avx2", rows_avx2<float>, rows_avx2<at::BFloat16>, false};
const Form kBf16Products{"avx512bf16", rows_avx2<float>, rows_avx2<at::BFloat16>, true};
#endif

// The CPU has bf16 dot-product instructions (AVX-512 BF16): the GEMV's best form, and
// oneDNN's bf16 matmul behind at::linear runs faster than an fp32 product of the same shape (without them it emulates
// bf16 and runs slower).
bool native_bf16_products() {
#if CPMGEN_X86
  __builtin_cpu_init();
  static const bool native = __builtin_cpu_supports("avx512bf16");
  return native;
#else
  return false;
#endif
}

// The forms this CPU runs, best first.
std::vector<const Form*> supported() {
  std::vector<const Form*> out;
#if CPMGEN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    if (native_bf16_products()) out.push_back(&kBf16Products);
    out.push_back(&kAvx2);
  }
#endif
  out.push_back(&kGeneric);
  return out;
}

std::atomic<const Form*>& chosen() {
  static std::atomic<const Form*> form{supported().front()};
  return form;
}

// Switches to the form called `name` and returns the name of the one it replaces.
std::string use(const std::string& name) { return cpmgen::switch_loops(chosen(), supported(), name, "gemv_use"); }

// y for the groups of output rows begin..end, each of the m input rows in turn.
template <typename T, typename X>
void gemv_groups(Rows<T, X> rows_of, const X* xp, int64_t m, const T* wp, const T* b, int64_t n, int64_t k, T* yp,
                 int64_t begin, int64_t end) {
  float out[kGroup];
  for (int64_t g = begin; g < end; ++g) {
    const int64_t n0 = g * kGroup;
    const int rows = static_cast<int>(std::min(kGroup, n - n0));
    for (int64_t row = 0; row < m; ++row) {
      rows_of(wp + n0 * k, xp + row * k, k, rows, out);
      for (int r = 0; r < rows; ++r)
        yp[row * n + n0 + r] = static_cast<T>(b ? out[r] + static_cast<float>(b[n0 + r]) : out[r]);
    }
  }
}

}  // namespace

namespace cpmgen {

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, weight, bias, std::string("none"), c10::List<c10::optional<at::Scalar>>(),
                                 std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// x @ W^T + b for many fp32 rows (a window's prefill). oneDNN's fp32 matrix product runs at the
// CPU's own vector width: on an AMD CPU with AVX-512 it ran over twice as fast as at::linear's
// BLAS (MKL, which takes its AVX2 code there), and no slower with AVX2 alone. It costs more to set
// up, so small products (a few rows of a small model) stay with at::linear. Its values must not
// depend on the thread count (the thread tuner changes it mid-text): with torch 2.13's oneDNN
// (3.12) they did not, for CPM-Small's and CPM-Large's shapes at 5 to 1023 rows
// (tests/test_prepack.py checks it on the installed torch); torch 2.4's oneDNN (3.4) split large
// products by thread count. So it runs from torch 2.13 on; older torch keeps at::linear.
constexpr int64_t kOnednnMinProduct = int64_t{1} << 21;  // multiply-adds (rows x out x in)
constexpr bool kOnednnProducts = TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13);

at::Tensor matrix_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  static const bool onednn = kOnednnProducts && CPMGEN_X86 && at::hasMKLDNN() &&
                             c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""}).has_value();
  if (onednn && x.numel() * weight.size(0) >= kOnednnMinProduct) return onednn_linear(x.contiguous(), weight, bias);
  return at::linear(x, weight, bias);
}

int64_t gemv_units(const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t in_features) {
  const at::ScalarType dtype = weight.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && weight.dim() == 2 && weight.is_contiguous(),
              "gemv_linear: a contiguous fp32 or bf16 [out_features, in_features] weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(in_features == k, "gemv_linear: input has ", in_features, " features, the weight ", k);
  TORCH_CHECK(!(bias.has_value() && bias->defined()) ||
                  (bias->scalar_type() == dtype && bias->numel() == n && bias->is_contiguous()),
              "gemv_linear: bias must be [out_features] in the weight's dtype");
  return (n + kGroup - 1) / kGroup;
}

at::Tensor gemv_input(const at::Tensor& x, const at::Tensor& weight) {
  if (weight.scalar_type() == at::kBFloat16 && chosen().load()->bf16_products) return x.contiguous();
  return x.to(at::kFloat).contiguous();  // x itself when fp32 and contiguous
}

void gemv_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::Tensor& y,
               int64_t begin, int64_t end) {
  const int64_t m = x.size(0), n = weight.size(0), k = weight.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
  const Form& form = *chosen().load();
  if (weight.scalar_type() == at::kFloat) {
    gemv_groups(form.fp32, x.data_ptr<float>(), m, weight.data_ptr<float>(),
                has_bias ? bias->data_ptr<float>() : nullptr, n, k, y.data_ptr<float>(), begin, end);
    return;
  }
  const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
  const at::BFloat16* bp = has_bias ? bias->data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  if (x.scalar_type() == at::kFloat) {
    gemv_groups(form.bf16_widened, x.data_ptr<float>(), m, wp, bp, n, k, yp, begin, end);
    return;
  }
  TORCH_CHECK(form.bf16_products, "gemv_rows: a bf16 input needs the ", form.name,
              " form to take it (gemv_input gives the form's input)");
#if CPMGEN_X86
  gemv_groups<at::BFloat16, at::BFloat16>(rows_bf16_products, x.data_ptr<at::BFloat16>(), m, wp, bp, n, k, yp, begin, end);
#endif
}

at::Tensor gemv_linear(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t units = gemv_units(weight, bias, input.size(-1));
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "gemv_linear: the input must be in the weight's dtype");
  const int64_t n = weight.size(0), k = weight.size(1);
  if (input.numel() > kGemvMaxRows * k) {
    if (weight.scalar_type() == at::kFloat) return matrix_linear(input, weight, bias);
    if (native_bf16_products()) return at::linear(input, weight, bias);
    // bf16 without bf16 dot-product instructions: at::linear's bf16 product runs several times
    // slower than fp32's there, so the rows go through fp32 copies (of the weight too, a matrix
    // at a time) and are rounded to bf16 once at the end.
    const c10::optional<at::Tensor> bias_float =
        bias.has_value() && bias->defined() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : c10::nullopt;
    return matrix_linear(input.to(at::kFloat), weight.to(at::kFloat), bias_float).to(at::kBFloat16);
  }
  const at::Tensor x = gemv_input(input.reshape({-1, k}), weight);
  at::Tensor y = at::empty({x.size(0), n}, input.options());
  split_units(units, 16, [&](int64_t begin, int64_t end) { gemv_rows(x, weight, bias, y, begin, end); });
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = n;
  return y.view(shape);
}

}  // namespace cpmgen

TORCH_LIBRARY_FRAGMENT(cpmgen, m) {
  m.def("gemv_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("native_bf16_products() -> bool", native_bf16_products);
  m.def("gemv_form() -> str", []() { return std::string(chosen().load()->name); });
  m.def("gemv_use(str name) -> str", use);
  m.def("gemv_forms() -> str[]", []() {
    std::vector<std::string> names;
    for (const Form* form : supported()) names.emplace_back(form->name);
    return names;
  });
}

TORCH_LIBRARY_IMPL(cpmgen, CPU, m) { m.impl("gemv_linear", cpmgen::gemv_linear); }

// The parts of a sampling step (cpmgen/sampling.py) that torch runs slowly on one row of a
// vocabulary: sorting it for top-p, and the exponential race that draws the token. Each gives
// exactly what its torch form gives (the same values, the same token, the generator left in the
// same state), so a sample does not depend on whether the library is built.
//
// descending_values(x [rows, n] fp32, no NaN) -> [rows, n]: each row's values from the greatest
//   to the least, as torch.sort(x, descending=True).values. The values alone (which a top-p
//   filter's softmax and running sum read) are the same whatever order a sort leaves equal values
//   in; a radix sort on the floats' bits, where torch's sort of (value, index) pairs is a
//   comparison sort.
// top_p_keep(x [rows, n] fp32, sorted = descending_values(x), cumulative = the running totals of
//   softmax(sorted), top_p) -> x with all but each row's first `kept` values set to -inf, kept =
//   1 + the number of totals before the last that are at most top_p (the first token, and each
//   one after a total still at or below p), first in the order of a stable descending sort
//   (greater values first, equal ones by index): the top-p filter's mask without the sort's index
//   permutation (torch.sort(x, descending=True, stable=True), then a scatter).
// race_argmax(probs [rows, n] fp32, generator) -> [rows] int64: argmax(probs / race) with race
//   = torch.empty_like(probs).exponential_(1.0, generator=generator): the exponential variates of
//   the CPU generator's exponential_ (at::exponential_distribution<double>, one per entry, row after
//   row, rounded to float), each computed only where it can change the result (a zero
//   probability's quotient is 0 for any variate but the one a zero uniform gives; a quotient
//   whose bound p / u is below the greatest one so far cannot be chosen). The generator
//   still draws one value per entry, so it ends where torch's would. cpmgen/sampling.py checks
//   once that this matches torch's exponential_ before relying on it.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

namespace {

// A float's bits made into an unsigned key that orders as the floats do from the greatest down
// (-0 just after +0, which compare equal as floats and so are equal values to a sort).
inline uint32_t descending_key(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const uint32_t ascending = bits & 0x80000000u ? ~bits : bits | 0x80000000u;
  return ~ascending;
}

inline float value_of(uint32_t key) {
  const uint32_t ascending = ~key;
  const uint32_t bits = ascending & 0x80000000u ? ascending & 0x7fffffffu : ~ascending;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Least significant digit first, 11 bits a pass: three passes over n 32-bit keys (a pass whose
// digit is the same for every key moves nothing and is skipped). Sorts keys[0..n) using spare[0..n);
// returns where the sorted keys are (keys or spare).
uint32_t* sort_keys(uint32_t* keys, uint32_t* spare, int64_t n) {
  constexpr int kBits = 11, kBuckets = 1 << kBits, kPasses = 3;
  uint32_t counts[kPasses][kBuckets] = {};
  for (int64_t i = 0; i < n; ++i)
    for (int p = 0; p < kPasses; ++p) ++counts[p][(keys[i] >> (p * kBits)) & (kBuckets - 1)];
  for (int p = 0; p < kPasses; ++p) {
    uint32_t* count = counts[p];
    if (count[(keys[0] >> (p * kBits)) & (kBuckets - 1)] == n) continue;
    uint32_t start = 0;
    for (int b = 0; b < kBuckets; ++b) {
      const uint32_t c = count[b];
      count[b] = start;
      start += c;
    }
    for (int64_t i = 0; i < n; ++i) spare[count[(keys[i] >> (p * kBits)) & (kBuckets - 1)]++] = keys[i];
    std::swap(keys, spare);
  }
  return keys;
}

at::Tensor check_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) > 0 && x.device().is_cpu(), op,
              ": x must be CPU fp32 [rows, n] with n >= 1");
  return x.contiguous();
}

at::Tensor descending_values(const at::Tensor& x_in) {
  const at::Tensor x = check_rows(x_in, "descending_values");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n < (int64_t{1} << 32), "descending_values: rows of fewer than 2^32 values");
  at::Tensor out = at::empty_like(x);
  // Buffers the calling thread keeps from one call to the next (a vocabulary's row each step).
  thread_local std::vector<uint32_t> buffer;
  buffer.resize(static_cast<size_t>(2 * n));
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x.data_ptr<float>() + r * n;
    uint32_t* keys = buffer.data();
    bool nan = false;  // checked after the loop, which then has no branch and vectorizes
    for (int64_t i = 0; i < n; ++i) {
      nan |= row[i] != row[i];
      keys[i] = descending_key(row[i]);
    }
    TORCH_CHECK(!nan, "descending_values: row ", r, " holds a NaN");
    const uint32_t* sorted = sort_keys(buffer.data(), buffer.data() + n, n);
    float* o = out.data_ptr<float>() + r * n;
    for (int64_t i = 0; i < n; ++i) o[i] = value_of(sorted[i]);
  }
  return out;
}

at::Tensor top_p_keep(const at::Tensor& x_in, const at::Tensor& sorted_in, const at::Tensor& cumulative_in,
                      double top_p) {
  const at::Tensor x = check_rows(x_in, "top_p_keep"), sorted = check_rows(sorted_in, "top_p_keep"),
                   cumulative = check_rows(cumulative_in, "top_p_keep");
  TORCH_CHECK(sorted.sizes() == x.sizes() && cumulative.sizes() == x.sizes(),
              "top_p_keep: sorted and cumulative must be x's descending values and their running totals");
  const int64_t rows = x.size(0), n = x.size(1);
  const float limit = static_cast<float>(top_p);  // as torch compares an fp32 tensor with a Python float
  const float minus_inf = -std::numeric_limits<float>::infinity();
  at::Tensor out = at::empty_like(x);
  for (int64_t r = 0; r < rows; ++r) {
    const float* total = cumulative.data_ptr<float>() + r * n;
    int64_t kept = 1;
    for (int64_t i = 0; i + 1 < n; ++i) kept += total[i] <= limit;
    const float* s = sorted.data_ptr<float>() + r * n;
    const float least = s[kept - 1];  // the least value kept
    int64_t first_equal = kept - 1;
    while (first_equal > 0 && s[first_equal - 1] == least) --first_equal;
    int64_t last_equal = kept - 1;
    while (last_equal + 1 < n && s[last_equal + 1] == least) ++last_equal;
    const float* row = x.data_ptr<float>() + r * n;
    float* o = out.data_ptr<float>() + r * n;
    for (int64_t i = 0; i < n; ++i) o[i] = row[i] >= least ? row[i] : minus_inf;
    // Where the cut falls among values equal to `least`, only the first kept - first_equal of them
    // (by index) stay.
    if (last_equal >= kept) {
      int64_t equal_left = kept - first_equal;
      for (int64_t i = 0; i < n; ++i)
        if (row[i] == least && equal_left-- <= 0) o[i] = minus_inf;
    }
  }
  return out;
}

at::Tensor race_argmax(const at::Tensor& probs_in, const c10::optional<at::Generator>& generator) {
  const at::Tensor probs = check_rows(probs_in, "race_argmax");
  const int64_t rows = probs.size(0), n = probs.size(1);
  at::Tensor out = at::empty({rows}, probs.options().dtype(at::kLong));
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  // The generator's engine, run here inline (a call into the generator for each value cost more
  // than the rest of the loop) and handed back at the end. A double takes two of its 32-bit
  // values, the first as the high half (CPUGeneratorImpl::random64).
  at::mt19937 engine = gen->engine();
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = probs.data_ptr<float>() + r * n;
    // torch's argmax: the first greatest quotient, or the first NaN where there is one
    float best = 0.f;
    int64_t best_index = 0;
    bool nan = false;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t high = engine(), low = engine();
      const double u = at::transformation::uniform_real<double>((static_cast<uint64_t>(high) << 32) | low, 0.0, 1.0);
      if (nan) continue;  // the generator still draws for every entry
      // A zero probability over a positive variate (every variate but a zero uniform's) is 0.
      if (p[i] == 0.f && u != 0.0) {
        if (i == 0) best = 0.f;  // the first quotient is the greatest so far
        continue;
      }
      // The variate -log1p(-u) is at least u, so for p > 0 the quotient is at most p / u, up to
      // the log's rounding and the two roundings to float (about 1e-7 of it, and far less than
      // 1e-5 of a greatest quotient so far of at least 1e-30, whatever subnormal rounding adds):
      // where p / u with a 1e-5 margin is below that greatest quotient, this one is below it too
      // and cannot be chosen, and its log is not computed. Most of a wide top-p set is skipped so.
      if (i > 0 && p[i] > 0.f && u != 0.0 && best >= 1e-30f &&
          static_cast<double>(p[i]) * (1.0 + 1e-5) < static_cast<double>(best) * u)
        continue;
      const float q = p[i] / static_cast<float>(at::transformation::exponential<double>(u, 1.0));
      if (std::isnan(q)) {
        nan = true;
        best_index = i;
      } else if (i == 0 || q > best) {
        best = q;
        best_index = i;
      }
    }
    out.data_ptr<int64_t>()[r] = best_index;
  }
  gen->set_engine(engine);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cpmgen, m) {
  m.def("descending_values(Tensor x) -> Tensor");
  m.def("top_p_keep(Tensor x, Tensor sorted, Tensor cumulative, float top_p) -> Tensor");
  m.def("race_argmax(Tensor probs, Generator? generator) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpmgen, CPU, m) {
  m.impl("descending_values", descending_values);
  m.impl("top_p_keep", top_p_keep);
  m.impl("race_argmax", race_argmax);
}

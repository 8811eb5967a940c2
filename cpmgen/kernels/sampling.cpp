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
//   whose upper bound p / u is below another's lower bound p (1 - u) / u cannot be chosen). The
//   generator's engine still draws two values per entry (in bulk, as its own calls would), so it
//   ends where torch's would. cpmgen/sampling.py checks once that this matches torch's
//   exponential_ before relying on it.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

namespace {

// A float's bits made into an unsigned key that orders as the floats do from the greatest down
// (-0 just after +0, which compare equal as floats and so are equal values to a sort): in
// ascending order a negative float's bits all flip, a positive one's sign bit. Without a branch
// on the sign (an arithmetic shift spreads it over the word), as the loops over a row vectorize:
// a branch on the signs of fresh logits, half of them negative, missed about every other time,
// and converting a row cost more than sorting it.
inline uint32_t descending_key(float f) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, f);
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u;
  return ~(bits ^ flip);
}

inline float value_of(uint32_t key) {
  const uint32_t ascending = ~key;  // its top bit set: a positive float's
  const uint32_t flip = ~static_cast<uint32_t>(static_cast<int32_t>(ascending) >> 31) | 0x80000000u;
  return __builtin_bit_cast(float, ascending ^ flip);
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

// The values at::mt19937's operator() would give next, `count` of them into `out`, and the
// engine's state `pod` moved on as that many calls move it: the state's words tempered in bulk,
// and the state twisted every 624 values (the engine's own next_state, in loops that vectorize).
// One call into the engine per value, with its branch and index, had cost more than all the
// arithmetic of the race that uses them.
CPMGEN_WIDE_CLONES
void twist_state(uint32_t* s) {
  auto twist = [](uint32_t u, uint32_t v) {
    return (((u & at::UMASK) | (v & at::LMASK)) >> 1) ^ ((v & 1u) ? at::MATRIX_A : 0u);
  };
  constexpr int kN = at::MERSENNE_STATE_N, kM = at::MERSENNE_STATE_M;
  for (int i = 0; i < kN - kM; ++i) s[i] = s[i + kM] ^ twist(s[i], s[i + 1]);
  for (int i = kN - kM; i < kN - 1; ++i) s[i] = s[i + kM - kN] ^ twist(s[i], s[i + 1]);
  s[kN - 1] = s[kM - 1] ^ twist(s[kN - 1], s[0]);
}

CPMGEN_WIDE_CLONES
void temper(const uint32_t* state, uint32_t* out, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    uint32_t y = state[i];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    out[i] = y ^ (y >> 18);
  }
}

void draw_words(at::mt19937_data_pod& pod, uint32_t* out, int64_t count) {
  while (count > 0) {
    // The engine gives state_[next_] for each of its next left_ - 1 calls; the call after them
    // twists the state and gives its words from the first, leaving left_ = 624 after that one.
    if (pod.left_ == 1) {
      twist_state(pod.state_.data());
      pod.left_ = at::MERSENNE_STATE_N + 1;
      pod.next_ = 0;
    }
    const int64_t take = std::min<int64_t>(count, pod.left_ - 1);
    temper(pod.state_.data() + pod.next_, out, take);
    pod.next_ += static_cast<uint32_t>(take);
    pod.left_ -= static_cast<int>(take);
    out += take;
    count -= take;
  }
}

// The uniform values of n entries from their 2n words, each as at::uniform_real_distribution<double>
// makes it from CPUGeneratorImpl::random64 (the first word the high half; 53 bits scaled by 2^-53,
// the halves converted apart, exactly), into u; returns the greatest lower bound p (1 - u) / u of
// the entries' quotients p / -log1p(-u) (-log1p(-u) <= u / (1 - u)), 0 where there is none (zero
// uniforms, NaN probabilities left out). The greatest is taken over the bounds' bits as integers,
// which order as non-negative doubles do (negative ones fall below the 0 it starts from): the
// compiler vectorizes an integer maximum, not a floating-point one, whose NaNs it must keep.
CPMGEN_WIDE_CLONES
double uniforms_and_lower_bound(const float* p, const uint32_t* words, double* u, int64_t n) {
  int64_t best = 0;  // the bits of 0.0
  for (int64_t i = 0; i < n; ++i) {
    const double high = static_cast<double>(words[2 * i] & 0x1fffffu), low = static_cast<double>(words[2 * i + 1]);
    const double value = (high * 4294967296.0 + low) * (1.0 / 9007199254740992.0);
    u[i] = value;
    const double bound = static_cast<double>(p[i]) * (1.0 - value) / value;
    const int64_t bits = __builtin_bit_cast(int64_t, value > 0.0 && bound == bound ? bound : 0.0);
    best = bits > best ? bits : best;
  }
  return __builtin_bit_cast(double, best);
}

// flags[i] = 1 where entry i may still hold the greatest quotient given one of at least `least`:
// not where p * (1 + 1e-5) < least * u (its quotient's upper bound p / u with a margin for the
// roundings, see race_argmax, is below `least`). NaN probabilities and zero uniforms stay.
CPMGEN_WIDE_CLONES
void flag_candidates(const float* p, const double* u, double least, uint8_t* flags, int64_t n) {
  for (int64_t i = 0; i < n; ++i) flags[i] = !(static_cast<double>(p[i]) * (1.0 + 1e-5) < least * u[i]);
}

at::Tensor race_argmax(const at::Tensor& probs_in, const c10::optional<at::Generator>& generator) {
  const at::Tensor probs = check_rows(probs_in, "race_argmax");
  const int64_t rows = probs.size(0), n = probs.size(1);
  at::Tensor out = at::empty({rows}, probs.options().dtype(at::kLong));
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  // The generator's engine state, drawn from here and handed back at the end.
  at::mt19937 engine = gen->engine();
  at::mt19937_data_pod pod = engine.data();
  // Buffers the calling thread keeps from one call to the next (a vocabulary's row each step).
  thread_local std::vector<uint32_t> words;
  thread_local std::vector<double> uniforms;
  thread_local std::vector<uint8_t> flags;
  words.resize(static_cast<size_t>(2 * n));
  uniforms.resize(static_cast<size_t>(n));
  flags.resize(static_cast<size_t>(n) + 8);
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = probs.data_ptr<float>() + r * n;
    draw_words(pod, words.data(), 2 * n);  // the generator draws for every entry, whatever it holds
    const double* u = uniforms.data();
    // Every entry's quotient p / E, E = -log1p(-u) rounded to float and the quotient in float,
    // is within about 2e-7 of its exact value, and the exact one lies between p (1 - u) / u and
    // p / u. So with a greatest lower bound L of at least 1e-30 (far from subnormal quotients),
    // an entry with p (1 + 1e-5) < L (1 - 1e-5) u is below the entry that gave L and cannot be
    // chosen: its log is not computed. The rest, a handful where the probabilities fall off,
    // are computed as torch computes them, in order.
    const double lower = uniforms_and_lower_bound(p, words.data(), uniforms.data(), n);
    const bool prune = std::isfinite(lower) && lower >= 1e-30;
    if (prune) {
      flag_candidates(p, u, lower * (1.0 - 1e-5), flags.data(), n);
    } else {
      std::fill(flags.begin(), flags.begin() + n, uint8_t{1});
    }
    std::fill(flags.begin() + n, flags.end(), uint8_t{0});
    // torch's argmax: the first greatest quotient, or the first NaN where there is one
    float best = 0.f;
    int64_t best_index = -1;
    for (int64_t block = 0; block < n; block += 8) {
      uint64_t any;
      std::memcpy(&any, flags.data() + block, sizeof(any));
      if (any == 0) continue;
      for (int64_t i = block; i < std::min(n, block + 8); ++i) {
        if (!flags[i]) continue;
        // A zero probability over a positive variate (every variate but a zero uniform's) is 0.
        const float q = p[i] == 0.f && u[i] != 0.0
                            ? 0.f
                            : p[i] / static_cast<float>(at::transformation::exponential<double>(u[i], 1.0));
        if (std::isnan(q)) {
          best_index = i;
          block = n;  // the first NaN is the result
          break;
        }
        if (best_index < 0 || q > best) {
          best = q;
          best_index = i;
        }
      }
    }
    out.data_ptr<int64_t>()[r] = best_index;
  }
  engine.set_data(pod);
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

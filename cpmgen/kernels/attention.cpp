// Attention ops.
//
// decode_attention: the attention of a decode step in one op: one new token per sequence writes
// its key and value into the KV cache at its position, then attends to cache slots 0..position.
//
//   qkv     [B, 1, 3 * H * D] (or [B, 3 * H * D]), fp32 or bf16: the fused projection, [q; k; v]
//   k_cache [B, H, S, D] fp32 or bf16, v_cache the same (written in place at slot pos[b]); the
//           scores and sums are fp32 either way (a bf16 entry widens to a float exactly)
//   pos     [B], [B, 1] or one for all, int64: each sequence's position (its new token's slot)
//   -> out  [B, 1, H * D] in qkv's dtype: softmax(q k^T / sqrt(D)) v per head, heads side by side
//
// The plain PyTorch form (model.Attention) runs some twenty small operations a layer for this;
// on a CPU each costs more than its arithmetic at one token. Work is split by (sequence, head) and
// each value is computed by one thread in a fixed order, so the result does not depend on the
// number of threads. The loops are plain C++ whose floating point operations are separate
// multiplies and adds in a fixed order (no contraction: -ffp-contract=off; sums kept in
// kWidth interleaved partial sums), so the AVX-512, AVX2 and baseline versions the compiler makes
// of them give the same bits.
//
// causal_attention: a window's attention (a prefill, or the slow path's recompute without a
// cache), every token at once, each seeing itself and the tokens before it:
//   q, k, v [B, H, T, D] fp32, any strides with each row of D contiguous (views of the fused
//           projection's output, or of the cache's first T slots)
//   -> out  [B, H, T, D]: a view of a contiguous [B, T, H, D] tensor, so the heads side by side
//           ([B, T, H * D], what the output projection takes) is a view too
// Work is split by (sequence, head); within one, kQueryRows queries at a time: their scores against
// kKeys keys at a time (from a transposed copy of the head's keys, so that a key's scores for the
// rows are lanes of vectors), each row's softmax as decode_attention's, then the weights times the
// values, kQueryRows output rows at a time. Every value is one thread's sum in a fixed order (over
// the head dimension for a score, over the keys for an output; vector lanes are independent sums),
// so it depends neither on the thread count nor on the vector width of the version the CPU runs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace {

constexpr int kWidth = cpmgen::kVectorFloats;  // interleaved partial sums: one AVX2 register of floats
using cpmgen::Floats8;
using cpmgen::load_floats;

// b: fp32 or bf16.
template <typename T>
inline __attribute__((always_inline)) float dot(const float* a, const T* b, int64_t n) {
  Floats8 sums = {};
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) sums = sums + load_floats(a + i) * load_floats(b + i);
  float part[kWidth];
  __builtin_memcpy(part, &sums, sizeof(part));
  for (int l = 0; i < n; ++i, ++l) part[l] = part[l] + a[i] * cpmgen::widen(b[i]);
  return cpmgen::lanes_sum<kWidth>(part);
}

// The scores of kWidth keys at once: each key's kWidth partial sums as dot makes them (the same
// products added in the same order), the keys' additions interleaved so that the CPU works on
// kWidth independent sums instead of waiting on one key's chain of additions, then each key's
// total as lanes_sum<kWidth> makes it (lane l plus lane l + 4, then l + 2, then l + 1), for the
// kWidth keys together on vectors paired up by shuffles: the bits of dot, key by key.
// keys: kWidth rows of D values, D apart.
static_assert(kWidth == 8, "key_scores8's shuffles add up eight partial sums");
template <int D, typename T>
inline __attribute__((always_inline)) Floats8 key_scores8(const float* q, const T* keys) {
  Floats8 sums[kWidth];
#pragma GCC unroll 8
  for (int u = 0; u < kWidth; ++u) sums[u] = Floats8{};
#pragma GCC unroll 16
  for (int i = 0; i < D; i += kWidth) {
    const Floats8 qi = load_floats(q + i);
#pragma GCC unroll 8
    for (int u = 0; u < kWidth; ++u) sums[u] = sums[u] + qi * load_floats(keys + u * D + i);
  }
  typedef int32_t Index8 __attribute__((vector_size(kWidth * sizeof(int32_t))));
  const Index8 low4{0, 1, 2, 3, 8, 9, 10, 11}, high4{4, 5, 6, 7, 12, 13, 14, 15};
  const Index8 low2{0, 1, 4, 5, 8, 9, 12, 13}, high2{2, 3, 6, 7, 10, 11, 14, 15};
  const Index8 even{0, 2, 4, 6, 8, 10, 12, 14}, odd{1, 3, 5, 7, 9, 11, 13, 15};
  Floats8 fours[4], twos[2];  // lanes: keys 2j and 2j + 1 side by side; then keys 4j..4j + 3
  for (int j = 0; j < 4; ++j)
    fours[j] = __builtin_shuffle(sums[2 * j], sums[2 * j + 1], low4) + __builtin_shuffle(sums[2 * j], sums[2 * j + 1], high4);
  for (int j = 0; j < 2; ++j)
    twos[j] = __builtin_shuffle(fours[2 * j], fours[2 * j + 1], low2) + __builtin_shuffle(fours[2 * j], fours[2 * j + 1], high2);
  return __builtin_shuffle(twos[0], twos[1], even) + __builtin_shuffle(twos[0], twos[1], odd);
}

// A softmax's numerators and denominator: scores[0..n) become e^(score - the maximum), and their
// sum (kWidth interleaved partial sums) is returned.
inline __attribute__((always_inline)) float exps_and_total(float* scores, int64_t n) {
  // The maximum, kWidth lanes at a time (a NaN never replaces a value, as in one pass from the
  // first score; a tie of 0 and -0 may keep either, which the subtraction below does not tell apart).
  Floats8 tops;
  for (int l = 0; l < kWidth; ++l) tops[l] = scores[0];
  int64_t s = 0;
  for (; s + kWidth <= n; s += kWidth) {
    const Floats8 v = load_floats(scores + s);
    tops = v > tops ? v : tops;
  }
  float top = tops[0];
  for (int l = 1; l < kWidth; ++l) top = tops[l] > top ? tops[l] : top;
  for (; s < n; ++s) top = scores[s] > top ? scores[s] : top;
#pragma omp simd
  for (s = 0; s < n; ++s) scores[s] = cpmgen::exp_nonpositive(scores[s] - top);
  Floats8 sums = {};
  for (s = 0; s + kWidth <= n; s += kWidth) sums = sums + load_floats(scores + s);
  float part[kWidth];
  __builtin_memcpy(part, &sums, sizeof(part));
  for (int l = 0; s < n; ++s, ++l) part[l] = part[l] + scores[s];
  return cpmgen::lanes_sum<kWidth>(part);
}

// One head of one sequence: q [d]; keys/values [slots, d] (fp32 or bf16), slot `pos` already
// written. The same fp32 arithmetic for both: a bf16 cache of bf16 keys and values gives the bits
// an fp32 cache of the same values gives. D: the head size where it is known when compiled (the
// released models' 64 and 80), so that q and the output sums stay in registers instead of being
// stored and loaded again for every key (out may alias q for all the compiler knows); 0: any d,
// read from `d_in`. Both do the same operations in the same order, so they give the same bits.
template <int D, typename T>
inline __attribute__((always_inline)) void attend_in(const float* q_in, const T* keys, const T* values, int64_t pos,
                                                     int64_t d_in, float scale, float* weights, float* out) {
  constexpr bool fixed = D > 0;
  const int64_t d = fixed ? D : d_in;
  float q_own[fixed ? D : 1], sums_own[fixed ? D : 1];
  const float* q = q_in;
  float* sums = out;
  if constexpr (fixed) {
    for (int64_t i = 0; i < D; ++i) q_own[i] = q_in[i];
    q = q_own;
    sums = sums_own;
  }
  const int64_t n = pos + 1;
  // The cache's rows, like the weights, are read once a step: read ahead with the non-temporal
  // hint. The loops ask for their rows kStreamAhead bytes ahead of where they read, so the first
  // kStreamAhead bytes of the keys and of the values are asked for here, before the first row.
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t b = 0; b < std::min(n * row_bytes, cpmgen::kStreamAhead); b += 64) {
    cpmgen::prefetch_streamed(reinterpret_cast<const char*>(keys) + b);
    cpmgen::prefetch_streamed(reinterpret_cast<const char*>(values) + b);
  }
  int64_t s = 0;
  if constexpr (fixed && D % kWidth == 0) {
    for (; s + kWidth <= n; s += kWidth) {
      for (int64_t b = 0; b < kWidth * row_bytes; b += 64)
        cpmgen::prefetch_ahead(reinterpret_cast<const char*>(keys + s * D) + b);
      const Floats8 scores = key_scores8<D>(q, keys + s * D) * scale;
      __builtin_memcpy(weights + s, &scores, sizeof(scores));
    }
  }
  for (; s < n; ++s) {
    for (int64_t b = 0; b < row_bytes; b += 64) cpmgen::prefetch_ahead(reinterpret_cast<const char*>(keys + s * d) + b);
    weights[s] = dot(q, keys + s * d, d) * scale;
  }
  const float total = exps_and_total(weights, n);
  for (int64_t i = 0; i < d; ++i) sums[i] = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    const float w = weights[t] / total;
    const T* v = values + t * d;
    for (int64_t b = 0; b < row_bytes; b += 64) cpmgen::prefetch_ahead(reinterpret_cast<const char*>(v) + b);
    for (int64_t i = 0; i < d; ++i) sums[i] = sums[i] + w * cpmgen::widen(v[i]);
  }
  if constexpr (fixed)
    for (int64_t i = 0; i < D; ++i) out[i] = sums_own[i];
}

template <typename T>
inline __attribute__((always_inline)) void attend_any(const float* q, const T* keys, const T* values, int64_t pos,
                                                      int64_t d, float scale, float* weights, float* out) {
  switch (d) {
    case 64: attend_in<64>(q, keys, values, pos, d, scale, weights, out); break;
    case 80: attend_in<80>(q, keys, values, pos, d, scale, weights, out); break;
    default: attend_in<0>(q, keys, values, pos, d, scale, weights, out);
  }
}

// AVX-512 too: the output sums are lanes (the scores' kWidth partial sums stay 8 wide in every version).
CPMGEN_WIDE_CLONES void attend(const float* q, const float* keys, const float* values, int64_t pos, int64_t d,
                               float scale, float* weights, float* out) {
  attend_any(q, keys, values, pos, d, scale, weights, out);
}

CPMGEN_WIDE_CLONES void attend(const float* q, const at::BFloat16* keys, const at::BFloat16* values, int64_t pos,
                               int64_t d, float scale, float* weights, float* out) {
  attend_any(q, keys, values, pos, d, scale, weights, out);
}

template <typename T>
void store(const float* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(x[i]);
}

// Task `task` ((sequence, head) pair) of a step whose cache holds T (float or at::BFloat16): the
// new key and value into their slot (rounded as Tensor.to rounds them: exact for bf16 values),
// then the head's attention into head_out. Returns where the head's output goes in step.out.
template <typename T>
int64_t attend_task(const cpmgen::AttentionStep& step, int64_t task, std::vector<float>& weights, float* head_out) {
  const int64_t slots = step.k_cache.size(2), d = step.k_cache.size(3), heads = step.heads, width = heads * d;
  const int64_t b = task / heads, h = task % heads, p = step.pos.data_ptr<int64_t>()[b];
  const float* row = step.qkv.data_ptr<float>() + b * 3 * width;
  T* keys = step.k_cache.data_ptr<T>() + b * step.k_cache.stride(0) + h * slots * d;
  T* values = step.v_cache.data_ptr<T>() + b * step.v_cache.stride(0) + h * slots * d;
  store(row + width + h * d, keys + p * d, d);
  store(row + 2 * width + h * d, values + p * d, d);
  attend(row + h * d, keys, values, p, d, 1.f / std::sqrt(static_cast<float>(d)), weights.data(), head_out);
  return b * width + h * d;
}

// Vectors of 16 floats (GCC's vector extensions): one AVX-512 register, two AVX2 ones, or plain
// code, lane by lane; a multiply and an add stay separate operations (no contraction).
typedef float Vec16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr int kQueryRows = 4;   // queries computed together (each load of a key or value row serves them all)
constexpr int kKeys = 2 * kLanes;  // keys whose scores one pass computes for those queries

inline __attribute__((always_inline)) Vec16 load16(const float* p) {
  Vec16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline __attribute__((always_inline)) void store16(float* p, Vec16 v) { __builtin_memcpy(p, &v, sizeof(v)); }

// scores[r * stride + j] = scale * (q row r . key j) for rows 0..kQueryRows-1 (q rows q_stride apart;
// a row past `rows` reads row 0 again and is never used) and keys 0..n-1 rounded up to kKeys, the
// keys transposed in keys_t ([d][stride], zero past the last key).
inline __attribute__((always_inline)) void scores_block(const float* q, int64_t q_stride, int rows,
                                                        const float* keys_t, int64_t stride, int64_t n, int64_t d,
                                                        float scale, float* scores) {
  const float* row[kQueryRows];
  for (int r = 0; r < kQueryRows; ++r) row[r] = q + (r < rows ? r : 0) * q_stride;
  for (int64_t j0 = 0; j0 < n; j0 += kKeys) {
    Vec16 acc[kQueryRows][2] = {};
    for (int64_t i = 0; i < d; ++i) {
      const Vec16 k0 = load16(keys_t + i * stride + j0), k1 = load16(keys_t + i * stride + j0 + kLanes);
      for (int r = 0; r < kQueryRows; ++r) {
        const float qv = row[r][i];
        acc[r][0] = acc[r][0] + qv * k0;
        acc[r][1] = acc[r][1] + qv * k1;
      }
    }
    for (int r = 0; r < kQueryRows; ++r) {
      store16(scores + r * stride + j0, acc[r][0] * scale);
      store16(scores + r * stride + j0 + kLanes, acc[r][1] * scale);
    }
  }
}

// Row r's scores (keys 0..n_r-1, n_r = first + r + 1) into softmax weights, as decode_attention
// computes them; the weights of keys n_r.. up to `n` set to 0 (they add nothing below).
inline __attribute__((always_inline)) void softmax_rows(float* scores, int64_t stride, int rows, int64_t first,
                                                        int64_t n) {
  for (int r = 0; r < rows; ++r) {
    float* w = scores + r * stride;
    const int64_t seen = first + r + 1;
    const float total = exps_and_total(w, seen);
    for (int64_t s = 0; s < seen; ++s) w[s] = w[s] / total;
    for (int64_t s = seen; s < n; ++s) w[s] = 0.f;
  }
}

// out rows 0..rows-1 (out_stride apart), each the sum over keys 0..n-1 of its weight times the
// key's value row, in key order; D / kLanes vectors a row (D a multiple of kLanes).
template <int D>
inline __attribute__((always_inline)) void values_block(const float* weights, int64_t stride, int rows,
                                                        const float* values, int64_t v_stride, int64_t n, float* out,
                                                        int64_t out_stride) {
  constexpr int kVecs = D / kLanes;
  Vec16 acc[kQueryRows][kVecs] = {};
  for (int64_t t = 0; t < n; ++t) {
    Vec16 v[kVecs];
    for (int c = 0; c < kVecs; ++c) v[c] = load16(values + t * v_stride + c * kLanes);
    for (int r = 0; r < kQueryRows; ++r) {
      const float w = weights[r * stride + t];
      for (int c = 0; c < kVecs; ++c) acc[r][c] = acc[r][c] + w * v[c];
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < kVecs; ++c) store16(out + r * out_stride + c * kLanes, acc[r][c]);
}

// Any head size: the same sums (over keys, in key order), one lane at a time.
inline __attribute__((always_inline)) void values_block_any(const float* weights, int64_t stride, int rows,
                                                            const float* values, int64_t v_stride, int64_t n,
                                                            int64_t d, float* out, int64_t out_stride) {
  for (int r = 0; r < rows; ++r) {
    float* o = out + r * out_stride;
    for (int64_t i = 0; i < d; ++i) o[i] = 0.f;
    for (int64_t t = 0; t < n; ++t) {
      const float w = weights[r * stride + t];
      const float* v = values + t * v_stride;
      for (int64_t i = 0; i < d; ++i) o[i] = o[i] + w * v[i];
    }
  }
}

// One head of one sequence: t query rows (q_stride apart), keys and values (k_stride, v_stride
// apart); output row i at out + i * out_stride.
struct CausalHead {
  const float *q, *k, *v;
  int64_t q_stride, k_stride, v_stride, out_stride, t, d;
  float* out;
};

template <int D>
inline __attribute__((always_inline)) void causal_head_in(const CausalHead& h, std::vector<float>& scratch) {
  // Rows of the transposed keys kLanes floats longer than the keys rounded up to kKeys: a multiple
  // of 4 KB apart, the rows a score reads in turn would all fall into the same few sets of the L1 cache.
  const int64_t d = h.d, stride = (h.t + kKeys - 1) / kKeys * kKeys + kLanes;
  scratch.assign(static_cast<size_t>((d + kQueryRows) * stride), 0.f);
  float* keys_t = scratch.data();
  float* scores = keys_t + d * stride;
  for (int64_t j = 0; j < h.t; ++j)
    for (int64_t i = 0; i < d; ++i) keys_t[i * stride + j] = h.k[j * h.k_stride + i];
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  for (int64_t first = 0; first < h.t; first += kQueryRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kQueryRows, h.t - first));
    const int64_t n = first + rows;  // the keys the block's last query sees
    scores_block(h.q + first * h.q_stride, h.q_stride, rows, keys_t, stride, n, d, scale, scores);
    softmax_rows(scores, stride, rows, first, n);
    if (rows < kQueryRows)  // the rows past `rows` add nothing anywhere
      for (int64_t s = rows * stride; s < kQueryRows * stride; ++s) scores[s] = 0.f;
    float* out = h.out + first * h.out_stride;
    if constexpr (D > 0)
      values_block<D>(scores, stride, rows, h.v, h.v_stride, n, out, h.out_stride);
    else
      values_block_any(scores, stride, rows, h.v, h.v_stride, n, d, out, h.out_stride);
  }
}

CPMGEN_WIDE_CLONES void causal_head(const CausalHead& h, std::vector<float>& scratch) {
  switch (h.d) {
    case 64: causal_head_in<64>(h, scratch); break;
    case 80: causal_head_in<80>(h, scratch); break;
    default: causal_head_in<0>(h, scratch);
  }
}

}  // namespace

namespace cpmgen {

at::Tensor decode_positions(const at::Tensor& pos_in, int64_t batch, int64_t slots) {
  const at::Tensor pos = pos_in.to(at::kLong).reshape(-1);
  TORCH_CHECK(pos.numel() == batch || pos.numel() == 1,
              "decode_attention: one position per sequence, or one for all of them");
  at::Tensor positions = pos.expand(batch).contiguous();
  const int64_t* p = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    TORCH_CHECK(p[b] >= 0 && p[b] < slots, "decode_attention: position ", p[b], " outside the cache's ", slots, " slots");
  return positions;
}

AttentionStep attention_step(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& positions, int64_t heads, const at::Tensor& out,
                             const at::Tensor& qkv_f32) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16,
              "decode_attention: qkv must be fp32 or bf16");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type() &&
                  (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16),
              "decode_attention: the caches must be fp32 or bf16 [batch, heads, slots, head_dim] of one shape and dtype");
  const int64_t batch = k_cache.size(0), d = k_cache.size(3);
  TORCH_CHECK(heads == k_cache.size(1) && qkv.size(-1) == 3 * heads * d && qkv.numel() == batch * 3 * heads * d &&
                  qkv.is_contiguous(),
              "decode_attention: qkv must be a contiguous [batch, 1, 3 * heads * head_dim] for the cache's shape");
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->stride(3) == 1 && c->stride(2) == d && c->stride(1) == k_cache.size(2) * d,
                "decode_attention: each cache row must be contiguous");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == batch,
              "decode_attention: positions as decode_positions gives them");
  AttentionStep step;
  step.pos = positions;
  step.k_cache = k_cache;
  step.v_cache = v_cache;
  step.heads = heads;
  if (qkv.scalar_type() == at::kFloat) {
    step.qkv = qkv.view({batch, 3 * heads * d});
  } else if (qkv_f32.defined()) {
    TORCH_CHECK(qkv_f32.scalar_type() == at::kFloat && qkv_f32.is_contiguous() && qkv_f32.numel() == qkv.numel(),
                "decode_attention: the fp32 copy of qkv must be contiguous fp32 of qkv's size");
    step.qkv = qkv_f32.view({batch, 3 * heads * d});
  } else {
    step.qkv = at::empty({batch, 3 * heads * d}, qkv.options().dtype(at::kFloat));
  }
  if (out.defined()) {
    TORCH_CHECK(out.is_contiguous() && out.numel() == batch * heads * d && out.scalar_type() == qkv.scalar_type(),
                "decode_attention: out must be contiguous, batch x heads x head_dim values in qkv's dtype");
    step.out = out;
  } else {
    step.out = at::empty({batch, 1, heads * d}, qkv.options());
  }
  return step;
}

void attention_input(const AttentionStep& step, const at::Tensor& qkv) {
  if (qkv.scalar_type() == at::kFloat) return;  // step.qkv is qkv itself
  const at::BFloat16* from = qkv.data_ptr<at::BFloat16>();
  float* to = step.qkv.data_ptr<float>();
  for (int64_t i = 0, n = step.qkv.numel(); i < n; ++i) to[i] = cpmgen::widen(from[i]);
}

void attention_units(const AttentionStep& step, int64_t begin, int64_t end) {
  const int64_t d = step.k_cache.size(3);
  std::vector<float> weights(step.k_cache.size(2)), head_out(d);
  const bool bf16_cache = step.k_cache.scalar_type() == at::kBFloat16, fp32 = step.out.scalar_type() == at::kFloat;
  float* out_f32 = fp32 ? step.out.data_ptr<float>() : nullptr;
  at::BFloat16* out_bf16 = fp32 ? nullptr : step.out.data_ptr<at::BFloat16>();
  for (int64_t task = begin; task < end; ++task) {
    const int64_t offset = bf16_cache ? attend_task<at::BFloat16>(step, task, weights, head_out.data())
                                      : attend_task<float>(step, task, weights, head_out.data());
    if (fp32) {
      store(head_out.data(), out_f32 + offset, d);
    } else {
      store(head_out.data(), out_bf16 + offset, d);
    }
  }
}

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& pos, int64_t heads) {
  const at::Tensor x = qkv.contiguous();
  AttentionStep step = attention_step(x, k_cache, v_cache, decode_positions(pos, k_cache.size(0), k_cache.size(2)), heads);
  attention_input(step, x);
  at::parallel_for(0, step.units(), 1, [&](int64_t begin, int64_t end) { attention_units(step, begin, end); });
  return step.out;
}

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "causal_attention: q, k and v must be [batch, heads, tokens, head_dim] of one shape");
  for (const at::Tensor* x : {&q, &k, &v})
    TORCH_CHECK(x->scalar_type() == at::kFloat && x->stride(3) == 1,
                "causal_attention: q, k and v must be fp32 with each head_dim row contiguous");
  const int64_t batch = q.size(0), heads = q.size(1), t = q.size(2), d = q.size(3);
  at::Tensor out = at::empty({batch, t, heads, d}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / heads, h = unit % heads;
      const CausalHead head{qp + b * q.stride(0) + h * q.stride(1), kp + b * k.stride(0) + h * k.stride(1),
                            vp + b * v.stride(0) + h * v.stride(1), q.stride(2), k.stride(2), v.stride(2),
                            heads * d, t, d, op + (b * t * heads + h) * d};
      causal_head(head, scratch);
    }
  });
  return out.transpose(1, 2);
}

}  // namespace cpmgen

TORCH_LIBRARY_FRAGMENT(cpmgen, m) {
  m.def("decode_attention(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor pos, int heads) -> Tensor");
  m.def("causal_attention(Tensor q, Tensor k, Tensor v) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpmgen, CPU, m) {
  m.impl("decode_attention", cpmgen::decode_attention);
  m.impl("causal_attention", cpmgen::causal_attention);
}

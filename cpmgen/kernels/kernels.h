// The ops the kernel sources share (each is also registered as torch.ops.cpmgen.<name>), and
// their parts for block.cpp, which runs a whole block in one parallel region: each op is split
// into its checks and set-up (one thread) and its work over independent units (output row
// blocks, heads) that any thread may take, a range at a time. A unit's values do not depend on
// which thread runs it, so the op and the block give the same bits.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

// A loop compiled twice, for AVX2 and for the baseline, the version the CPU runs picked when the
// library loads (GCC's function multiversioning); the loops' operations and order are the same in
// both, so they give the same bits.
// CPMGEN_WIDE_CLONES adds an AVX-512 version, for loops whose vector lanes are separate sums
// (element-wise work, or sums across rows), which give the same bits at any vector width.
#if defined(__x86_64__) && defined(__GNUC__)
#define CPMGEN_CLONES __attribute__((target_clones("avx2", "default")))
#define CPMGEN_WIDE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CPMGEN_CLONES
#define CPMGEN_WIDE_CLONES
#endif

namespace cpmgen {

// e^x for x <= 0 (a score minus its row's maximum, a GELU's exponent): Cephes' single-precision
// exp (range reduction by ln 2, a degree-6 polynomial; within 2 ulp of the exact value), in
// arithmetic the compiler vectorizes. Below -87 the result would not be a normal float: 0.
inline __attribute__((always_inline)) float exp_nonpositive(float x_in) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding and taking it away rounds to an integer
  const float x = x_in < -87.f ? -87.f : x_in;
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r * r + r) + 1.f;
  const float two_n = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  return x_in < -87.f ? 0.f : p * two_n;
}

// A value as a float: a bf16 value widens exactly (it is the float's upper half), here as the bit
// shift itself, which the compiler vectorizes (through at::BFloat16's conversion it did not: a
// bf16 cache's attention ran slower than an fp32 one's).
inline __attribute__((always_inline)) float widen(float x) { return x; }
inline __attribute__((always_inline)) float widen(at::BFloat16 x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x.x) << 16);
}

// Eight floats as one vector (GCC's vector extensions: one AVX2 register, two SSE ones in the
// baseline build), lane by lane the same operations as a loop over an array of them; a
// comparison gives a mask of -1 (true) or 0 per lane.
constexpr int kVectorFloats = 8;
typedef float Floats8 __attribute__((vector_size(kVectorFloats * sizeof(float))));
typedef int32_t Mask8 __attribute__((vector_size(kVectorFloats * sizeof(int32_t))));
typedef uint32_t Words8 __attribute__((vector_size(kVectorFloats * sizeof(uint32_t))));

inline __attribute__((always_inline)) Floats8 load_floats(const float* p) {
  Floats8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// Eight bf16 values widened (widen's bit shift) into one vector: a zero-extending load and a
// shift for the eight, where widening them into an array of floats compiled to four times as
// many instructions on half-width registers (a bf16 cache's attention scores were arithmetic-bound).
inline __attribute__((always_inline)) Floats8 load_floats(const at::BFloat16* p) {
  Words8 bits;
  for (int l = 0; l < kVectorFloats; ++l) bits[l] = static_cast<uint32_t>(p[l].x) << 16;
  return reinterpret_cast<Floats8>(bits);
}

// The total of W partial sums, added pairwise in a fixed order (part is overwritten).
template <int W>
inline __attribute__((always_inline)) float lanes_sum(float* part) {
  for (int w = W / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) part[l] = part[l] + part[l + w];
  return part[0];
}

// Units [0, count) over the `threads` threads of a parallel region, run(begin, end) a range at a
// time: each thread first runs a contiguous part of its own (kOwnShare of the units, split evenly:
// one long read of the weights, which the hardware prefetchers follow), then takes the rest a
// small chunk at a time from `counter` (zero before the region): a thread that gets ahead (the
// other one started later or was slowed by the machine) runs more of them instead of waiting.
// Which thread runs a unit does not change its values.
constexpr double kOwnShare = 0.75;
template <typename Run>
inline void share_units(std::atomic<int64_t>& counter, int64_t count, int64_t threads, int64_t thread, Run&& run) {
  const int64_t own = static_cast<int64_t>(count * kOwnShare / threads), taken = own * threads;
  if (own > 0) run(thread * own, (thread + 1) * own);
  const int64_t chunk = std::max<int64_t>(1, (count - taken) / (4 * threads));
  for (int64_t begin; (begin = taken + counter.fetch_add(chunk, std::memory_order_relaxed)) < count;)
    run(begin, std::min(begin + chunk, count));
}

// share_units in a parallel region of its own on torch's threads (run on the calling thread
// alone where there are at most `grain` units, or inside another parallel region).
template <typename Run>
inline void split_units(int64_t count, int64_t grain, Run&& run) {
  if (count <= grain || at::in_parallel_region() || at::get_num_threads() == 1) {
    if (count > 0) run(0, count);
    return;
  }
  std::atomic<int64_t> counter{0};
#pragma omp parallel num_threads(at::get_num_threads())
  share_units(counter, count, omp_get_num_threads(), omp_get_thread_num(), run);
}

// The weights' loops (qlinear.cpp, gemv.cpp) and the decode attention's reads of the KV cache
// (attention.cpp) read each byte once a step. They ask for the bytes kStreamAhead ahead of where
// they read with the non-temporal hint: the lines come in early and, being marked, do not push
// out of the caches what the step's small pieces (activations, buffers, the interpreter's own
// data between calls) use again. A prefetch never faults, so reading ahead past the end of a
// weight or a cache row is harmless.
constexpr int64_t kStreamAhead = 4096;
// The line holding p, with that hint (for a read's first kStreamAhead bytes, which no loop asks for ahead).
inline __attribute__((always_inline)) void prefetch_streamed(const void* p) { __builtin_prefetch(p, 0, 0); }
inline __attribute__((always_inline)) void prefetch_ahead(const void* p) {
  prefetch_streamed(static_cast<const char*>(p) + kStreamAhead);
}

// Switches `chosen` to the entry of `supported` (each with a `name`) called `name` and returns the
// name of the one it replaces; `op` names the switch in the error for a name the CPU does not run.
template <typename Loops>
std::string switch_loops(std::atomic<const Loops*>& chosen, const std::vector<const Loops*>& supported,
                         const std::string& name, const char* op) {
  std::string names;
  for (const Loops* loops : supported) {
    if (name == loops->name) return chosen.exchange(loops)->name;
    names += (names.empty() ? "" : ", ") + std::string(loops->name);
  }
  TORCH_CHECK(false, op, ": this CPU runs ", names, ", not ", name);
}

// qlinear.cpp: x [..., in_features] -> x @ W^T + b for int8 or int4 weights in the packed layout.
at::Tensor qlinear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& gparams, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& bias, int64_t n, int64_t bits, int64_t group);

// A packed weight's pointers and sizes (checked); its units are blocks of 16 output rows.
struct QuantizedWeight {
  const uint8_t* packed = nullptr;
  const uint8_t* gparams = nullptr;  // int4 only
  const float* scale = nullptr;
  const float* bias = nullptr;
  int64_t n = 0, k = 0, bits = 0, group = 0, blocks = 0, block_bytes = 0;
};
QuantizedWeight quantized_weight(const at::Tensor& packed, const at::Tensor& gparams, const at::Tensor& scale,
                                 const c10::optional<at::Tensor>& bias, int64_t n, int64_t bits, int64_t group);

// The input rows quantized to int8 (symmetric per row), with their sums per group.
struct QuantizedInput {
  int64_t rows = 0;
  std::vector<int8_t> q;       // [rows][K]
  std::vector<float> scale;    // [rows]
  std::vector<int32_t> sums;   // [rows][K / group]
};
// x: contiguous [rows, in_features]; `parallel`: split the rows over threads (not inside a region).
void quantize_input(const QuantizedWeight& w, const at::Tensor& x, QuantizedInput& a, bool parallel);
// y [rows, n] (fp32 or bf16) for the output blocks begin..end.
void qlinear_blocks(const QuantizedWeight& w, const QuantizedInput& a, at::Tensor& y, int64_t begin, int64_t end);

// attention.cpp: a decode step's attention (the key and value written into the cache first).
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& pos, int64_t heads);

// The attention of a decode step, checked and set up; its units are (sequence, head) pairs.
struct AttentionStep {
  at::Tensor qkv;  // [batch, 3 * heads * head_dim] fp32
  at::Tensor pos;  // [batch] int64
  at::Tensor k_cache, v_cache;
  at::Tensor out;  // the heads' outputs side by side, batch x heads x head_dim values (contiguous), in the input's dtype
  int64_t heads = 0;
  int64_t units() const { return qkv.size(0) * heads; }
};
// The positions of a decode step's sequences ([B], [B, 1] or one for all), checked against the
// cache's slots: [batch] int64, contiguous.
at::Tensor decode_positions(const at::Tensor& pos, int64_t batch, int64_t slots);
// `qkv` contiguous, fp32 or bf16; `positions` from decode_positions. A bf16 qkv is widened into
// `qkv_f32` (where given; else a new tensor) by `attention_input`, which must run before the
// units. `out`, where given, is where the heads' outputs go (contiguous), else a new
// [batch, 1, heads * head_dim] tensor.
AttentionStep attention_step(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& positions, int64_t heads, const at::Tensor& out = at::Tensor(),
                             const at::Tensor& qkv_f32 = at::Tensor());
void attention_input(const AttentionStep& step, const at::Tensor& qkv);
void attention_units(const AttentionStep& step, int64_t begin, int64_t end);

// gemv.cpp: x @ W^T + b for fp32 or bf16 W as nn.Linear holds it; a few rows read W once at memory speed.
at::Tensor gemv_linear(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// layernorm.cpp: layer norm over the last dimension (nn.LayerNorm's function), rows in parallel.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);
void check_layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& out);
// out's rows begin..end (x and out contiguous [rows, n], checked by check_layer_norm); one thread.
void layer_norm_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps, at::Tensor& out,
                     int64_t begin, int64_t end);

// gelu.cpp: GELU with the tanh approximation (F.gelu(x, approximate="tanh")'s function).
at::Tensor& gelu_tanh_(at::Tensor& x);  // in place, contiguous
// out[i] = GELU(x[i]) for i in [0, n), fp32 or bf16 (computed in fp32, rounded once); one thread.
void gelu_tanh_rows(const at::Tensor& x, at::Tensor& out);

constexpr int64_t kGemvMaxRows = 4;  // input rows gemv_linear reads itself (beyond, a matrix product)
// oneDNN's linear (mkldnn::_linear_pointwise) on a plain [N, K] weight or one prepacked by
// prepack.pack_weight.
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
// Checks weight and bias for inputs of `in_features` in the weight's dtype; the units are groups
// of output rows.
int64_t gemv_units(const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t in_features);
// The input rows [rows, K] (in the weight's dtype) in the form gemv_rows reads: bf16 as they are
// where the weight is bf16 and the GEMV's form in use takes them on dot products, else fp32;
// contiguous.
at::Tensor gemv_input(const at::Tensor& x, const at::Tensor& weight);
// y [rows, n] in the weight's dtype for the unit range; x: gemv_input's rows.
void gemv_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, at::Tensor& y,
               int64_t begin, int64_t end);

}  // namespace cpmgen

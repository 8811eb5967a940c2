// Int8 and int4 linears for the CPU: y = x @ W^T + b with dynamically quantized int8 activations.
//
// Each input row is quantized on the fly, symmetric per row (xq = round(x * 127 / max|x|)), and
// multiplied by integer weights with exact int32 sums; only the epilogue is in floating point:
//     y[m, n] = float(acc[m, n]) * (sx[m] * sw[n]) + bias[n]
// Every output element goes through the same operations whatever the number of rows, so a
// decode step and a window's prefill give bitwise the same values, and cpmgen/quantize.py's
// torch reference gives them too (the tests check this).
//
// Weights are stored unsigned (int8: w + 128; int4: a nibble u with its group's zero point) in blocks of
// 16 output rows interleaved 4 inputs at a time: the bytes of block b, step j are [16 rows][4 inputs].
//   int8: packed [N/16][K/4][16][4] bytes.
//   int4: packed [N/16][K/8][16][4] bytes, low nibbles inputs 8j..8j+3, high nibbles 8j+4..8j+7;
//         each group of G inputs of a row has an integer scale q and zero point z (gparams
//         [N/16][K/G][2][16]: q of the 16 rows, then z), the weight being q * (u - z) for the
//         nibble u. q <= 63, so the int32 sums cannot overflow below 17,000 inputs.
// N and K are padded by the packer (zero weights), K to a multiple of 4 (int8) or G (int4).
//
// Three versions of the inner loops, chosen at run time for the CPU it runs on (so a library
// built on one machine runs on another), all giving the same int32 sums and so the same bits:
//   avx512vnni: one vpdpbusd adds 4 unsigned-by-signed products to each of 16 row sums; the
//               weights' offset is taken back out through the activation sums:
//               sum((w + c) * x) = sum(w * x) + c * sum(x) (per group for int4).
//   avx2:       vpmaddubsw multiplies unsigned by signed bytes into int16 pair sums, vpmaddwd adds
//               the pairs into int32. int8 signs the weights (u ^ 0x80 = w) and moves the
//               activation's sign onto them, |x| * (w * sign x): each pair sum stays within int16
//               (2 * 127 * 127). int4 nibbles are small enough to add 8 pair sums in int16
//               (8 * 2 * 15 * 127 < 32768) before widening.
//   generic:    plain C++ loops.
// cpmgen::qlinear_use(name) switches to another one the CPU runs (tests and benchmarks compare them).
// avx512vnni also has loops over two weight blocks at once for many input rows (a prefill).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CPMGEN_X86 1
#define CPMGEN_AVX2 __attribute__((target("avx2,fma")))
#define CPMGEN_VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vnni")))
#else
#define CPMGEN_X86 0
#endif

namespace {

constexpr int kLanes = 16;  // output rows per block
constexpr int kRows = 4;    // input rows that share one pass over a weight block

// One ISA's inner loops: the sums acc[r][lane] of `rows` (1..kRows) input rows from m0 with the 16
// output rows of one weight block, and the quantization of one input row; where the ISA has them
// (else null), the same sums for two weight blocks at once, acc[block][r][lane] (block 1 at
// acc + kRows * kLanes), which qlinear_blocks runs for many input rows.
struct Kernels {
  const char* name;
  void (*int8)(const uint8_t* w, const int8_t* xq, const int32_t* sums, int64_t k, int64_t m0, int rows, int32_t* acc);
  void (*int4)(const uint8_t* w, const uint8_t* gparams, const int8_t* xq, const int32_t* sums, int64_t k,
               int64_t group, int64_t m0, int rows, int32_t* acc);
  void (*quantize_f32)(const float* x, int64_t k_in, int64_t k, int64_t group, int8_t* q, float* scale, int32_t* sums);
  void (*quantize_bf16)(const at::BFloat16* x, int64_t k_in, int64_t k, int64_t group, int8_t* q, float* scale,
                        int32_t* sums);
  void (*int8_pair)(const uint8_t* w0, const uint8_t* w1, const int8_t* xq, const int32_t* sums, int64_t k, int64_t m0,
                    int rows, int32_t* acc);
  void (*int4_pair)(const uint8_t* w0, const uint8_t* w1, const uint8_t* gparams0, const uint8_t* gparams1,
                    const int8_t* xq, const int32_t* sums, int64_t k, int64_t group, int64_t m0, int rows,
                    int32_t* acc);
};

// Inlined into each ISA's wrapper, so the compiler vectorizes it for that ISA; every version
// computes each value with the same IEEE operations (no contraction: -ffp-contract=off).
template <typename T>
inline __attribute__((always_inline)) void quantize_row(const T* x, int64_t k_in, int64_t k, int64_t group,
                                                         int8_t* q, float* scale, int32_t* sums) {
  float amax = 0.f;
  for (int64_t i = 0; i < k_in; ++i) amax = std::max(amax, std::fabs(static_cast<float>(x[i])));
  if (amax == 0.f) {
    std::memset(q, 0, k);
    *scale = 0.f;
  } else {
    const float inv = 127.f / amax;
    for (int64_t i = 0; i < k_in; ++i) {
      float v = std::nearbyint(static_cast<float>(x[i]) * inv);  // round half to even, as torch.round
      q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
    }
    std::memset(q + k_in, 0, k - k_in);
    *scale = amax / 127.f;
  }
  for (int64_t g = 0; g < k / group; ++g) {
    int32_t s = 0;
    for (int64_t i = g * group; i < (g + 1) * group; ++i) s += q[i];
    sums[g] = s;
  }
}

// Calls f<R> for R = rows: the sums of up to kRows input rows are kept in registers.
template <template <int> class F, typename... Args>
inline __attribute__((always_inline)) void by_rows(int rows, Args... args) {
  switch (rows) {
    case 1: F<1>::run(args...); break;
    case 2: F<2>::run(args...); break;
    case 3: F<3>::run(args...); break;
    default: F<4>::run(args...);
  }
}

// One version's entry points: its inner loops by row count and the input quantization,
// compiled for TARGET (empty: the baseline of the build); PAIR8 and PAIR4 its two-block loops
// (nullptr where it has none).
#define CPMGEN_KERNELS(VAR, NAME, TARGET, INT8, INT4, PAIR8, PAIR4)                                           \
  TARGET void VAR##_int8(const uint8_t* w, const int8_t* xq, const int32_t* sums, int64_t k, int64_t m0,       \
                         int rows, int32_t* acc) {                                                             \
    by_rows<INT8>(rows, w, xq, sums, k, m0, acc);                                                              \
  }                                                                                                            \
  TARGET void VAR##_int4(const uint8_t* w, const uint8_t* gparams, const int8_t* xq, const int32_t* sums,      \
                         int64_t k, int64_t group, int64_t m0, int rows, int32_t* acc) {                       \
    by_rows<INT4>(rows, w, gparams, xq, sums, k, group, m0, acc);                                              \
  }                                                                                                            \
  TARGET void VAR##_quantize_f32(const float* x, int64_t k_in, int64_t k, int64_t group, int8_t* q,            \
                                 float* scale, int32_t* sums) {                                                \
    quantize_row(x, k_in, k, group, q, scale, sums);                                                           \
  }                                                                                                            \
  TARGET void VAR##_quantize_bf16(const at::BFloat16* x, int64_t k_in, int64_t k, int64_t group, int8_t* q,    \
                                  float* scale, int32_t* sums) {                                               \
    quantize_row(x, k_in, k, group, q, scale, sums);                                                           \
  }                                                                                                            \
  constexpr Kernels VAR{NAME, VAR##_int8, VAR##_int4, VAR##_quantize_f32, VAR##_quantize_bf16, PAIR8, PAIR4};

// ---- generic ----

template <int R>
struct Int8Generic {
  static void run(const uint8_t* w, const int8_t* xq, const int32_t* sums, int64_t k, int64_t m0, int32_t* acc) {
    for (int r = 0; r < R; ++r) {
      const int8_t* x = xq + (m0 + r) * k;
      for (int lane = 0; lane < kLanes; ++lane) {
        int32_t s = 0;
        for (int64_t j = 0; j < k / 4; ++j)
          for (int i = 0; i < 4; ++i) s += static_cast<int32_t>(w[(j * kLanes + lane) * 4 + i]) * x[j * 4 + i];
        acc[r * kLanes + lane] = s - 128 * sums[m0 + r];
      }
    }
  }
};

template <int R>
struct Int4Generic {
  static void run(const uint8_t* w, const uint8_t* gparams, const int8_t* xq, const int32_t* sums, int64_t k,
                  int64_t group, int64_t m0, int32_t* acc) {
    const int64_t groups = k / group, steps = group / 8;
    for (int r = 0; r < R; ++r) {
      const int8_t* x = xq + (m0 + r) * k;
      for (int lane = 0; lane < kLanes; ++lane) {
        int32_t total = 0;
        for (int64_t g = 0; g < groups; ++g) {
          int32_t s = 0;
          for (int64_t j = g * steps; j < (g + 1) * steps; ++j)
            for (int i = 0; i < 4; ++i) {
              const uint8_t b = w[(j * kLanes + lane) * 4 + i];
              s += static_cast<int32_t>(b & 0x0F) * x[8 * j + i] + static_cast<int32_t>(b >> 4) * x[8 * j + 4 + i];
            }
          const uint8_t* p = gparams + g * 2 * kLanes;
          total += (s - p[kLanes + lane] * sums[(m0 + r) * groups + g]) * p[lane];
        }
        acc[r * kLanes + lane] = total;
      }
    }
  }
};

CPMGEN_KERNELS(kGeneric, "generic", , Int8Generic, Int4Generic, nullptr, nullptr)

#if CPMGEN_X86

// ---- avx2 ----

template <int R>
struct Int8Avx2 {
  CPMGEN_AVX2 static void run(const uint8_t* w, const int8_t* xq, const int32_t* sums, int64_t k, int64_t m0,
                              int32_t* acc) {
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
    __m256i s[R][2];  // rows 0-7 and 8-15 of the block
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm256_setzero_si256();
    for (int64_t j = 0; j < k / 4; ++j) {
      cpmgen::prefetch_ahead(w + j * 64);
      const __m256i w0 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 64)), flip);
      const __m256i w1 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 64 + 32)), flip);
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_set1_epi32(reinterpret_cast<const int32_t*>(xq + (m0 + r) * k)[j]);
        const __m256i ax = _mm256_abs_epi8(x);
        s[r][0] = _mm256_add_epi32(s[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, x)), ones));
        s[r][1] = _mm256_add_epi32(s[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, x)), ones));
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kLanes), s[r][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kLanes + 8), s[r][1]);
    }
  }
};

template <int R>
struct Int4Avx2 {
  CPMGEN_AVX2 static void run(const uint8_t* w, const uint8_t* gparams, const int8_t* xq, const int32_t* sums,
                              int64_t k, int64_t group, int64_t m0, int32_t* acc) {
    const int64_t groups = k / group, steps = group / 8;  // 64-byte steps per group
    constexpr int64_t kChunk = 4;  // steps whose 8 pair sums per lane are added in int16
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256i total[R][2];
    for (int r = 0; r < R; ++r) total[r][0] = total[r][1] = _mm256_setzero_si256();
    for (int64_t g = 0; g < groups; ++g) {
      __m256i part[R][2];
      for (int r = 0; r < R; ++r) part[r][0] = part[r][1] = _mm256_setzero_si256();
      for (int64_t c = g * steps; c < (g + 1) * steps; c += kChunk) {
        __m256i s[R][2];
        for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm256_setzero_si256();
        for (int64_t j = c; j < std::min(c + kChunk, (g + 1) * steps); ++j) {
          cpmgen::prefetch_ahead(w + j * 64);
          const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 64));
          const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 64 + 32));
          const __m256i lo0 = _mm256_and_si256(v0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
          const __m256i lo1 = _mm256_and_si256(v1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
          for (int r = 0; r < R; ++r) {
            const int32_t* x32 = reinterpret_cast<const int32_t*>(xq + (m0 + r) * k);
            const __m256i xl = _mm256_set1_epi32(x32[2 * j]), xh = _mm256_set1_epi32(x32[2 * j + 1]);
            s[r][0] = _mm256_add_epi16(s[r][0], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xl), _mm256_maddubs_epi16(hi0, xh)));
            s[r][1] = _mm256_add_epi16(s[r][1], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xl), _mm256_maddubs_epi16(hi1, xh)));
          }
        }
        for (int r = 0; r < R; ++r) {
          part[r][0] = _mm256_add_epi32(part[r][0], _mm256_madd_epi16(s[r][0], ones));
          part[r][1] = _mm256_add_epi32(part[r][1], _mm256_madd_epi16(s[r][1], ones));
        }
      }
      const uint8_t* p = gparams + g * 2 * kLanes;
      __m256i q[2], z[2];
      for (int h = 0; h < 2; ++h) {
        q[h] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * h)));
        z[h] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + kLanes + 8 * h)));
      }
      for (int r = 0; r < R; ++r) {
        const __m256i xs = _mm256_set1_epi32(sums[(m0 + r) * groups + g]);
        for (int h = 0; h < 2; ++h) {
          const __m256i exact = _mm256_sub_epi32(part[r][h], _mm256_mullo_epi32(z[h], xs));
          total[r][h] = _mm256_add_epi32(total[r][h], _mm256_mullo_epi32(exact, q[h]));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kLanes), total[r][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + r * kLanes + 8), total[r][1]);
    }
  }
};

CPMGEN_KERNELS(kAvx2, "avx2", CPMGEN_AVX2, Int8Avx2, Int4Avx2, nullptr, nullptr)

// ---- avx512vnni ----

template <int R>
struct Int8Vnni {
  CPMGEN_VNNI static void run(const uint8_t* w, const int8_t* xq, const int32_t* sums, int64_t k, int64_t m0,
                              int32_t* acc) {
    __m512i s[R][2];
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_si512();
    const int64_t steps = k / 4;
    int64_t j = 0;
    for (; j + 1 < steps; j += 2) {
      cpmgen::prefetch_ahead(w + j * 64);
      cpmgen::prefetch_ahead(w + (j + 1) * 64);
      const __m512i w0 = _mm512_loadu_si512(w + j * 64), w1 = _mm512_loadu_si512(w + (j + 1) * 64);
      for (int r = 0; r < R; ++r) {
        const int32_t* x32 = reinterpret_cast<const int32_t*>(xq + (m0 + r) * k);
        s[r][0] = _mm512_dpbusd_epi32(s[r][0], w0, _mm512_set1_epi32(x32[j]));
        s[r][1] = _mm512_dpbusd_epi32(s[r][1], w1, _mm512_set1_epi32(x32[j + 1]));
      }
    }
    if (j < steps) {
      const __m512i w0 = _mm512_loadu_si512(w + j * 64);
      for (int r = 0; r < R; ++r) {
        const int32_t* x32 = reinterpret_cast<const int32_t*>(xq + (m0 + r) * k);
        s[r][0] = _mm512_dpbusd_epi32(s[r][0], w0, _mm512_set1_epi32(x32[j]));
      }
    }
    for (int r = 0; r < R; ++r) {
      __m512i total = _mm512_add_epi32(s[r][0], s[r][1]);
      total = _mm512_sub_epi32(total, _mm512_set1_epi32(128 * sums[m0 + r]));
      _mm512_storeu_si512(acc + r * kLanes, total);
    }
  }
};

template <int R>
struct Int4Vnni {
  CPMGEN_VNNI static void run(const uint8_t* w, const uint8_t* gparams, const int8_t* xq, const int32_t* sums,
                              int64_t k, int64_t group, int64_t m0, int32_t* acc) {
    const int64_t groups = k / group, steps = group / 8;  // 64-byte vectors per group
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512i total[R];
    for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_si512();
    for (int64_t g = 0; g < groups; ++g) {
      // Four independent sums (a vpdpbusd waits for the one before on its sum), each at a fixed
      // index, so that they stay in registers: two 64-byte vectors per pass, low and high nibbles.
      __m512i s[R][4];
      for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = s[r][2] = s[r][3] = _mm512_setzero_si512();
      const int64_t end = (g + 1) * steps;
      int64_t j = g * steps;
      for (; j + 1 < end; j += 2) {
        cpmgen::prefetch_ahead(w + j * 64);
        cpmgen::prefetch_ahead(w + (j + 1) * 64);
        const __m512i v0 = _mm512_loadu_si512(w + j * 64), v1 = _mm512_loadu_si512(w + (j + 1) * 64);
        const __m512i lo0 = _mm512_and_si512(v0, low), hi0 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low);
        const __m512i lo1 = _mm512_and_si512(v1, low), hi1 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low);
        for (int r = 0; r < R; ++r) {
          const int32_t* x32 = reinterpret_cast<const int32_t*>(xq + (m0 + r) * k);
          s[r][0] = _mm512_dpbusd_epi32(s[r][0], lo0, _mm512_set1_epi32(x32[2 * j]));
          s[r][1] = _mm512_dpbusd_epi32(s[r][1], hi0, _mm512_set1_epi32(x32[2 * j + 1]));
          s[r][2] = _mm512_dpbusd_epi32(s[r][2], lo1, _mm512_set1_epi32(x32[2 * j + 2]));
          s[r][3] = _mm512_dpbusd_epi32(s[r][3], hi1, _mm512_set1_epi32(x32[2 * j + 3]));
        }
      }
      if (j < end) {  // an odd number of vectors per group
        const __m512i v = _mm512_loadu_si512(w + j * 64);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int r = 0; r < R; ++r) {
          const int32_t* x32 = reinterpret_cast<const int32_t*>(xq + (m0 + r) * k);
          s[r][0] = _mm512_dpbusd_epi32(s[r][0], lo, _mm512_set1_epi32(x32[2 * j]));
          s[r][1] = _mm512_dpbusd_epi32(s[r][1], hi, _mm512_set1_epi32(x32[2 * j + 1]));
        }
      }
      const uint8_t* p = gparams + g * 2 * kLanes;
      const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + kLanes)));
      for (int r = 0; r < R; ++r) {
        __m512i part = _mm512_add_epi32(_mm512_add_epi32(s[r][0], s[r][1]), _mm512_add_epi32(s[r][2], s[r][3]));
        part = _mm512_sub_epi32(part, _mm512_mullo_epi32(z, _mm512_set1_epi32(sums[(m0 + r) * groups + g])));
        total[r] = _mm512_add_epi32(total[r], _mm512_mullo_epi32(part, q));
      }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_si512(acc + r * kLanes, total[r]);
  }
};

// Many input rows (a window's prefill): the sums of two weight blocks at once (Kernels' int8_pair
// and int4_pair), so that each broadcast activation feeds a
// vpdpbusd of each block: half the broadcasts and activation reads for the same products, which
// is what the loops above run short of once the weights come from cache (a prefill's rows after
// the first few). The same integer sums, so the same values. int4 adds the low and the high
// nibbles' products into one sum per block and row: with a sum for each, they no longer all fit
// in registers and the loop ran slower.
template <int R>
struct Int8VnniPair {
  CPMGEN_VNNI static void run(const uint8_t* w0, const uint8_t* w1, const int8_t* xq, const int32_t* sums, int64_t k,
                              int64_t m0, int32_t* acc) {
    __m512i s[2][R];
    for (int r = 0; r < R; ++r) s[0][r] = s[1][r] = _mm512_setzero_si512();
    for (int64_t j = 0; j < k / 4; ++j) {
      const __m512i a = _mm512_loadu_si512(w0 + j * 64), b = _mm512_loadu_si512(w1 + j * 64);
      for (int r = 0; r < R; ++r) {
        const __m512i x = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(xq + (m0 + r) * k)[j]);
        s[0][r] = _mm512_dpbusd_epi32(s[0][r], a, x);
        s[1][r] = _mm512_dpbusd_epi32(s[1][r], b, x);
      }
    }
    for (int b = 0; b < 2; ++b)
      for (int r = 0; r < R; ++r)
        _mm512_storeu_si512(acc + (b * kRows + r) * kLanes,
                            _mm512_sub_epi32(s[b][r], _mm512_set1_epi32(128 * sums[m0 + r])));
  }
};

template <int R>
struct Int4VnniPair {
  CPMGEN_VNNI static void run(const uint8_t* w0, const uint8_t* w1, const uint8_t* gparams0, const uint8_t* gparams1,
                              const int8_t* xq, const int32_t* sums, int64_t k, int64_t group, int64_t m0,
                              int32_t* acc) {
    const int64_t groups = k / group, steps = group / 8;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512i total[2][R];
    for (int r = 0; r < R; ++r) total[0][r] = total[1][r] = _mm512_setzero_si512();
    for (int64_t g = 0; g < groups; ++g) {
      __m512i sum[2][R];  // per block and row: the two blocks' vpdpbusd do not wait on each other
      for (int r = 0; r < R; ++r) sum[0][r] = sum[1][r] = _mm512_setzero_si512();
      for (int64_t j = g * steps; j < (g + 1) * steps; ++j) {
        const __m512i a = _mm512_loadu_si512(w0 + j * 64), b = _mm512_loadu_si512(w1 + j * 64);
        const __m512i a_lo = _mm512_and_si512(a, low), a_hi = _mm512_and_si512(_mm512_srli_epi16(a, 4), low);
        const __m512i b_lo = _mm512_and_si512(b, low), b_hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
        for (int r = 0; r < R; ++r) {
          const int32_t* x32 = reinterpret_cast<const int32_t*>(xq + (m0 + r) * k);
          const __m512i x_lo = _mm512_set1_epi32(x32[2 * j]), x_hi = _mm512_set1_epi32(x32[2 * j + 1]);
          sum[0][r] = _mm512_dpbusd_epi32(sum[0][r], a_lo, x_lo);
          sum[1][r] = _mm512_dpbusd_epi32(sum[1][r], b_lo, x_lo);
          sum[0][r] = _mm512_dpbusd_epi32(sum[0][r], a_hi, x_hi);
          sum[1][r] = _mm512_dpbusd_epi32(sum[1][r], b_hi, x_hi);
        }
      }
      const uint8_t* p[2] = {gparams0 + g * 2 * kLanes, gparams1 + g * 2 * kLanes};
      for (int b = 0; b < 2; ++b) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[b])));
        const __m512i z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[b] + kLanes)));
        for (int r = 0; r < R; ++r) {
          const __m512i part = _mm512_sub_epi32(sum[b][r],
                                                _mm512_mullo_epi32(z, _mm512_set1_epi32(sums[(m0 + r) * groups + g])));
          total[b][r] = _mm512_add_epi32(total[b][r], _mm512_mullo_epi32(part, q));
        }
      }
    }
    for (int b = 0; b < 2; ++b)
      for (int r = 0; r < R; ++r) _mm512_storeu_si512(acc + (b * kRows + r) * kLanes, total[b][r]);
  }
};

CPMGEN_VNNI void vnni_int8_pair(const uint8_t* w0, const uint8_t* w1, const int8_t* xq, const int32_t* sums, int64_t k,
                                int64_t m0, int rows, int32_t* acc) {
  by_rows<Int8VnniPair>(rows, w0, w1, xq, sums, k, m0, acc);
}
CPMGEN_VNNI void vnni_int4_pair(const uint8_t* w0, const uint8_t* w1, const uint8_t* gparams0, const uint8_t* gparams1,
                                const int8_t* xq, const int32_t* sums, int64_t k, int64_t group, int64_t m0, int rows,
                                int32_t* acc) {
  by_rows<Int4VnniPair>(rows, w0, w1, gparams0, gparams1, xq, sums, k, group, m0, acc);
}

CPMGEN_KERNELS(kVnni, "avx512vnni", CPMGEN_VNNI, Int8Vnni, Int4Vnni, vnni_int8_pair, vnni_int4_pair)

#endif  // CPMGEN_X86

// The versions this CPU runs, best first.
std::vector<const Kernels*> supported() {
  std::vector<const Kernels*> out;
#if CPMGEN_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni"))
    out.push_back(&kVnni);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back(&kAvx2);
#endif
  out.push_back(&kGeneric);
  return out;
}

std::atomic<const Kernels*>& chosen() {
  static std::atomic<const Kernels*> kernels{supported().front()};
  return kernels;
}

const Kernels& kernels() { return *chosen().load(); }

// Input rows from which qlinear_blocks takes the output blocks two at a time, where the chosen
// version has loops for that: at a decode step's few rows the weights stream from memory once
// either way.
constexpr int64_t kPairMinRows = 2 * kRows;

// Switches to the version called `name` and returns the name of the one it replaces.
std::string use(const std::string& name) { return cpmgen::switch_loops(chosen(), supported(), name, "qlinear_use"); }

template <typename T>
void epilogue(const int32_t* acc, int rows, const float* sx, const float* sw, const float* bias, int64_t n0,
              int64_t n, T* y, int64_t m0) {
  const int64_t lanes = std::min<int64_t>(kLanes, n - n0);
  for (int r = 0; r < rows; ++r) {
    T* out = y + (m0 + r) * n + n0;
    for (int64_t lane = 0; lane < lanes; ++lane) {
      float v = static_cast<float>(acc[r * kLanes + lane]) * (sx[m0 + r] * sw[n0 + lane]);
      if (bias) v = v + bias[n0 + lane];
      out[lane] = static_cast<T>(v);
    }
  }
}

}  // namespace

namespace cpmgen {

QuantizedWeight quantized_weight(const at::Tensor& packed, const at::Tensor& gparams, const at::Tensor& scale,
                                 const c10::optional<at::Tensor>& bias, int64_t n, int64_t bits, int64_t group) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 4 && packed.is_contiguous(), "qlinear: bad packed weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() >= n, "qlinear: scale must be fp32 [out_features]");
  TORCH_CHECK(bits == 8 || bits == 4, "qlinear: bits must be 8 or 4");
  QuantizedWeight q;
  q.n = n;
  q.bits = bits;
  q.blocks = packed.size(0);
  q.k = packed.size(1) * (bits == 8 ? 4 : 8);
  q.group = bits == 8 ? q.k : group;  // int8: one activation sum per row
  q.block_bytes = packed.size(1) * packed.size(2) * packed.size(3);
  TORCH_CHECK(q.blocks * kLanes >= n, "qlinear: out_features do not match the packed weight");
  if (bits == 4) {
    TORCH_CHECK(q.group > 0 && q.group % 8 == 0 && q.k % q.group == 0,
                "qlinear: the group size must divide in_features and be a multiple of 8");
    TORCH_CHECK(gparams.scalar_type() == at::kByte && gparams.is_contiguous() &&
                gparams.numel() == q.blocks * (q.k / q.group) * 2 * kLanes, "qlinear: bad group scales");
    q.gparams = gparams.data_ptr<uint8_t>();
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n, "qlinear: bias must be fp32 [out_features]");
    q.bias = bias->data_ptr<float>();
  }
  q.packed = packed.data_ptr<uint8_t>();
  q.scale = scale.data_ptr<float>();
  return q;
}

void quantize_input(const QuantizedWeight& w, const at::Tensor& x, QuantizedInput& a, bool parallel) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "qlinear: x must be contiguous fp32 or bf16 [rows, in_features]");
  TORCH_CHECK(x.size(1) <= w.k, "qlinear: x has more features than the packed weight");
  const Kernels& kern = kernels();
  const int64_t m = x.size(0), k_in = x.size(1), k = w.k, groups = w.k / w.group;
  a.rows = m;
  a.q.resize(m * k);
  a.scale.resize(m);
  a.sums.resize(m * groups);
  auto rows = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (x.scalar_type() == at::kFloat) {
        kern.quantize_f32(x.data_ptr<float>() + r * k_in, k_in, k, w.group, &a.q[r * k], &a.scale[r], &a.sums[r * groups]);
      } else {
        kern.quantize_bf16(x.data_ptr<at::BFloat16>() + r * k_in, k_in, k, w.group, &a.q[r * k], &a.scale[r],
                           &a.sums[r * groups]);
      }
    }
  };
  if (parallel) {
    at::parallel_for(0, m, 16, rows);
  } else {
    rows(0, m);
  }
}

void qlinear_blocks(const QuantizedWeight& w, const QuantizedInput& a, at::Tensor& y, int64_t begin, int64_t end) {
  const Kernels& kern = kernels();
  const int64_t m = a.rows, k = w.k, g = w.group;
  int32_t acc[kRows * kLanes];
  const bool fp32 = y.scalar_type() == at::kFloat;
  float* y_f32 = fp32 ? y.data_ptr<float>() : nullptr;
  at::BFloat16* y_bf16 = fp32 ? nullptr : y.data_ptr<at::BFloat16>();
  const int64_t group_bytes = (k / g) * 2 * kLanes;  // int4: a block's gparams
  // y's rows m0.. of block blk from its `rows` rows of sums
  auto finish = [&](const int32_t* block_acc, int rows, int64_t blk, int64_t m0) {
    if (fp32) {
      epilogue(block_acc, rows, a.scale.data(), w.scale, w.bias, blk * kLanes, w.n, y_f32, m0);
    } else {
      epilogue(block_acc, rows, a.scale.data(), w.scale, w.bias, blk * kLanes, w.n, y_bf16, m0);
    }
  };
  if (m >= kPairMinRows && kern.int8_pair) {
    int32_t acc2[2 * kRows * kLanes];
    for (; begin + 1 < end; begin += 2) {
      const uint8_t* w0 = w.packed + begin * w.block_bytes;
      for (int64_t m0 = 0; m0 < m; m0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, m - m0));
        if (w.bits == 8) {
          kern.int8_pair(w0, w0 + w.block_bytes, a.q.data(), a.sums.data(), k, m0, rows, acc2);
        } else {
          const uint8_t* g0 = w.gparams + begin * group_bytes;
          kern.int4_pair(w0, w0 + w.block_bytes, g0, g0 + group_bytes, a.q.data(), a.sums.data(), k, g, m0, rows, acc2);
        }
        for (int b = 0; b < 2; ++b) finish(acc2 + b * kRows * kLanes, rows, begin + b, m0);
      }
    }
  }
  for (int64_t blk = begin; blk < end; ++blk) {  // one at a time (the last of an odd count, or few rows)
    const uint8_t* wb = w.packed + blk * w.block_bytes;
    for (int64_t m0 = 0; m0 < m; m0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, m - m0));
      if (w.bits == 8) {
        kern.int8(wb, a.q.data(), a.sums.data(), k, m0, rows, acc);
      } else {
        kern.int4(wb, w.gparams + blk * group_bytes, a.q.data(), a.sums.data(), k, g, m0, rows, acc);
      }
      finish(acc, rows, blk, m0);
    }
  }
}

// x [..., in_features] -> y [..., out_features], in x's dtype.
at::Tensor qlinear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& gparams, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& bias, int64_t n, int64_t bits, int64_t group) {
  TORCH_CHECK(input.dim() >= 1, "qlinear: x must be [..., in_features]");
  const QuantizedWeight w = quantized_weight(packed, gparams, scale, bias, n, bits, group);
  const at::Tensor x = input.reshape({-1, input.size(-1)}).contiguous();
  QuantizedInput a;
  quantize_input(w, x, a, /*parallel=*/true);
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  split_units(w.blocks, 1, [&](int64_t begin, int64_t end) { qlinear_blocks(w, a, y, begin, end); });
  std::vector<int64_t> shape = input.sizes().vec();
  shape.back() = n;
  return y.view(shape);
}

}  // namespace cpmgen

TORCH_LIBRARY(cpmgen, m) {
  m.def("qlinear(Tensor x, Tensor packed, Tensor gparams, Tensor scale, Tensor? bias, int n, int bits, int group) -> Tensor");
  m.def("qlinear_isa() -> str", []() { return std::string(kernels().name); });
  m.def("qlinear_use(str name) -> str", use);
  m.def("qlinear_isas() -> str[]", []() {
    std::vector<std::string> names;
    for (const Kernels* k : supported()) names.push_back(k->name);
    return names;
  });
}

TORCH_LIBRARY_IMPL(cpmgen, CPU, m) { m.impl("qlinear", cpmgen::qlinear); }

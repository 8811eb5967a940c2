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
// 16 output rows interleaved 4 inputs at a time: the bytes of block b, step j are
// [16 rows][4 inputs], so one AVX-512 VNNI instruction (vpdpbusd) adds 4 products to each of 16
// row sums without any horizontal reduction. The offsets are taken back out through the
// activation sums: sum((w + c) * x) = sum(w * x) + c * sum(x) (per group for int4).
//   int8: packed [N/16][K/4][16][4] bytes.
//   int4: packed [N/16][K/8][16][4] bytes, low nibbles inputs 8j..8j+3, high nibbles 8j+4..8j+7;
//         each group of G inputs of a row has an integer scale q and zero point z (gparams
//         [N/16][K/G][2][16]: q of the 16 rows, then z), the weight being q * (u - z) for the
//         nibble u. q <= 63, so the int32 sums cannot overflow below 17,000 inputs.
// N and K are padded by the packer (zero weights), K to a multiple of 4 (int8) or G (int4).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define CPMGEN_VNNI 1
#else
#define CPMGEN_VNNI 0
#endif

namespace {

constexpr int kLanes = 16;  // output rows per block
constexpr int kRows = 4;    // input rows that share one pass over a weight block

struct Activations {
  std::vector<int8_t> q;       // [M][K]
  std::vector<float> scale;    // [M]
  std::vector<int32_t> sums;   // [M][K / group]: sum of q over each group
};

template <typename T>
void quantize_row(const T* x, int64_t k_in, int64_t k, int64_t group, int8_t* q, float* scale, int32_t* sums) {
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

Activations quantize(const at::Tensor& x, int64_t k, int64_t group) {
  const int64_t m = x.size(0), k_in = x.size(1);
  Activations a{std::vector<int8_t>(m * k), std::vector<float>(m), std::vector<int32_t>(m * (k / group))};
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (x.scalar_type() == at::kFloat) {
        quantize_row(x.data_ptr<float>() + r * k_in, k_in, k, group, &a.q[r * k], &a.scale[r], &a.sums[r * (k / group)]);
      } else {
        quantize_row(x.data_ptr<at::BFloat16>() + r * k_in, k_in, k, group, &a.q[r * k], &a.scale[r],
                     &a.sums[r * (k / group)]);
      }
    }
  });
  return a;
}

// acc[r][lane] for rows m0..m0+R-1 and the 16 output rows of block b.
template <int R>
void block_int8(const uint8_t* w, const int8_t* xq, const int32_t* sums, int64_t k, int64_t m0, int32_t* acc) {
#if CPMGEN_VNNI
  __m512i s[R][2];
  for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm512_setzero_si512();
  const int64_t steps = k / 4;
  int64_t j = 0;
  for (; j + 1 < steps; j += 2) {
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
#else
  for (int r = 0; r < R; ++r) {
    const int8_t* x = xq + (m0 + r) * k;
    for (int lane = 0; lane < kLanes; ++lane) {
      int32_t s = 0;
      for (int64_t j = 0; j < k / 4; ++j)
        for (int i = 0; i < 4; ++i) s += static_cast<int32_t>(w[(j * kLanes + lane) * 4 + i]) * x[j * 4 + i];
      acc[r * kLanes + lane] = s - 128 * sums[m0 + r];
    }
  }
#endif
}

template <int R>
void block_int4(const uint8_t* w, const uint8_t* gparams, const int8_t* xq, const int32_t* sums, int64_t k,
                int64_t group, int64_t m0, int32_t* acc) {
  const int64_t groups = k / group, steps = group / 8;  // 64-byte vectors per group
#if CPMGEN_VNNI
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512i total[R];
  for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_si512();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i s[R][4];  // four independent sums: a vpdpbusd waits for the one before on its sum
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = s[r][2] = s[r][3] = _mm512_setzero_si512();
    for (int64_t j = g * steps; j < (g + 1) * steps; ++j) {
      const int half = 2 * static_cast<int>(j & 1);
      const __m512i v = _mm512_loadu_si512(w + j * 64);
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int r = 0; r < R; ++r) {
        const int32_t* x32 = reinterpret_cast<const int32_t*>(xq + (m0 + r) * k);
        s[r][half] = _mm512_dpbusd_epi32(s[r][half], lo, _mm512_set1_epi32(x32[2 * j]));
        s[r][half + 1] = _mm512_dpbusd_epi32(s[r][half + 1], hi, _mm512_set1_epi32(x32[2 * j + 1]));
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
#else
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
#endif
}

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

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& gparams, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& bias, int64_t n, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "qlinear: x must be a contiguous [rows, in_features] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "qlinear: x must be fp32 or bf16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 4 && packed.is_contiguous(), "qlinear: bad packed weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() >= n, "qlinear: scale must be fp32 [out_features]");
  TORCH_CHECK(bits == 8 || bits == 4, "qlinear: bits must be 8 or 4");
  const int64_t blocks = packed.size(0);
  const int64_t k = packed.size(1) * (bits == 8 ? 4 : 8);
  const int64_t g = bits == 8 ? k : group;  // int8: one activation sum per row
  TORCH_CHECK(x.size(1) <= k && blocks * kLanes >= n, "qlinear: x or out_features do not match the packed weight");
  if (bits == 4) {
    TORCH_CHECK(g > 0 && g % 8 == 0 && k % g == 0, "qlinear: the group size must divide in_features and be a multiple of 8");
    TORCH_CHECK(gparams.scalar_type() == at::kByte && gparams.is_contiguous() &&
                gparams.numel() == blocks * (k / g) * 2 * kLanes, "qlinear: bad group scales");
  }
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == n, "qlinear: bias must be fp32 [out_features]");
    b = bias->data_ptr<float>();
  }
  const int64_t m = x.size(0);
  const Activations a = quantize(x, k, g);
  at::Tensor y = at::empty({m, n}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint8_t* gs = bits == 4 ? gparams.data_ptr<uint8_t>() : nullptr;
  const float* sw = scale.data_ptr<float>();
  const int64_t block_bytes = packed[0].numel();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    int32_t acc[kRows * kLanes];
    for (int64_t blk = begin; blk < end; ++blk) {
      const uint8_t* wb = w + blk * block_bytes;
      for (int64_t m0 = 0; m0 < m; m0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, m - m0));
        if (bits == 8) {
          switch (rows) {
            case 1: block_int8<1>(wb, a.q.data(), a.sums.data(), k, m0, acc); break;
            case 2: block_int8<2>(wb, a.q.data(), a.sums.data(), k, m0, acc); break;
            case 3: block_int8<3>(wb, a.q.data(), a.sums.data(), k, m0, acc); break;
            default: block_int8<4>(wb, a.q.data(), a.sums.data(), k, m0, acc);
          }
        } else {
          const uint8_t* gb = gs + blk * (k / g) * 2 * kLanes;
          switch (rows) {
            case 1: block_int4<1>(wb, gb, a.q.data(), a.sums.data(), k, g, m0, acc); break;
            case 2: block_int4<2>(wb, gb, a.q.data(), a.sums.data(), k, g, m0, acc); break;
            case 3: block_int4<3>(wb, gb, a.q.data(), a.sums.data(), k, g, m0, acc); break;
            default: block_int4<4>(wb, gb, a.q.data(), a.sums.data(), k, g, m0, acc);
          }
        }
        if (x.scalar_type() == at::kFloat) {
          epilogue(acc, rows, a.scale.data(), sw, b, blk * kLanes, n, y.data_ptr<float>(), m0);
        } else {
          epilogue(acc, rows, a.scale.data(), sw, b, blk * kLanes, n, y.data_ptr<at::BFloat16>(), m0);
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(cpmgen, m) {
  m.def("qlinear(Tensor x, Tensor packed, Tensor gparams, Tensor scale, Tensor? bias, int n, int bits, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpmgen, CPU, m) { m.impl("qlinear", qlinear); }

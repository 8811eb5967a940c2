// A decode step's transformer block in one op, for a block whose four linears hold int8 or int4
// weights (cpmgen/fused_decode.py): the ATen and cpmgen operations its modules run
// (model.Block over DecodeAttention and QuantizedLinear), in the same order, so bitwise the same
// values, without a Python call for each of them.
//
//   x [B, 1, hidden] fp32 or bf16
//   norms: input_layernorm weight and bias, then post_attention_layernorm weight and bias
//   packed, gparams, scales, biases, out_features: the linears query_key_value, dense,
//     dense_h_to_4h, dense_4h_to_h (QuantizedLinear's buffers); bits and group are the block's
//   k_cache, v_cache, pos, heads: as decode_attention

#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"

namespace cpmgen {

at::Tensor decode_block(const at::Tensor& x, at::TensorList norms, at::TensorList packed, at::TensorList gparams,
                        at::TensorList scales, const c10::List<c10::optional<at::Tensor>>& biases,
                        at::IntArrayRef out_features, int64_t bits, int64_t group, double eps,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos, int64_t heads) {
  TORCH_CHECK(norms.size() == 4 && packed.size() == 4 && gparams.size() == 4 && scales.size() == 4 &&
                  biases.size() == 4 && out_features.size() == 4,
              "decode_block: four norm tensors and four linears");
  const int64_t hidden = x.size(-1);
  auto linear = [&](const at::Tensor& in, size_t i) {
    return qlinear(in, packed[i], gparams[i], scales[i], biases.get(i), out_features[i], bits, group);
  };
  const at::Tensor qkv = linear(at::layer_norm(x, {hidden}, norms[0], norms[1], eps), 0);
  const at::Tensor h = x + linear(decode_attention(qkv, k_cache, v_cache, pos, heads), 1);
  return h + linear(at::gelu(linear(at::layer_norm(h, {hidden}, norms[2], norms[3], eps), 2), "tanh"), 3);
}

}  // namespace cpmgen

TORCH_LIBRARY_FRAGMENT(cpmgen, m) {
  m.def("decode_block(Tensor x, Tensor[] norms, Tensor[] packed, Tensor[] gparams, Tensor[] scales, Tensor?[] biases, "
        "int[] out_features, int bits, int group, float eps, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor pos, "
        "int heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpmgen, CPU, m) { m.impl("decode_block", cpmgen::decode_block); }

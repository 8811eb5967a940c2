// A decode step's transformer block in one op (cpmgen/fused_decode.py): the ATen and cpmgen
// operations its modules run (model.Block over DecodeAttention and the block's linears), in the
// same order, so bitwise the same values, without a Python call for each of them.
//
//   x [B, 1, hidden] fp32 or bf16
//   norms: input_layernorm weight and bias, then post_attention_layernorm weight and bias
//   kind: what the four linears (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) are, the
//     same for all four:
//     0 plain nn.Linear: weights = their weights (at::linear, as F.linear)
//     1 prepack.PackedLinear: weights = their oneDNN packed weights (mkldnn::_linear_pointwise)
//     2 quantize.QuantizedLinear: weights = packed int weights, with gparams, scales, bits, group
//     3 prepack.GemvLinear: weights = their weights (gemv_linear)
//   biases: the linears' biases; out_features: theirs (for the quantized kind)
//   k_cache, v_cache, pos, heads: as decode_attention

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "kernels.h"

namespace {

enum Kind : int64_t { kPlain = 0, kPacked = 1, kQuantized = 2, kGemv = 3 };

// oneDNN's linear on a prepacked weight, as prepack.packed_linear calls it from Python.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, weight, bias, std::string("none"), c10::List<c10::optional<at::Scalar>>(),
                                 std::string("")};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

namespace cpmgen {

at::Tensor decode_block(const at::Tensor& x, at::TensorList norms, int64_t kind, at::TensorList weights,
                        at::TensorList gparams, at::TensorList scales,
                        const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef out_features,
                        int64_t bits, int64_t group, double eps, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& pos, int64_t heads) {
  TORCH_CHECK(kind >= kPlain && kind <= kGemv, "decode_block: unknown linear kind ", kind);
  TORCH_CHECK(norms.size() == 4 && weights.size() == 4 && biases.size() == 4,
              "decode_block: four norm tensors and four linears");
  TORCH_CHECK(kind != kQuantized || (gparams.size() == 4 && scales.size() == 4 && out_features.size() == 4),
              "decode_block: quantized linears need their gparams, scales and out_features");
  const int64_t hidden = x.size(-1);
  auto linear = [&](const at::Tensor& in, size_t i) {
    switch (kind) {
      case kPlain: return at::linear(in, weights[i], biases.get(i));
      case kPacked: return packed_linear(in, weights[i], biases.get(i));
      case kGemv: return gemv_linear(in, weights[i], biases.get(i));
      default: return qlinear(in, weights[i], gparams[i], scales[i], biases.get(i), out_features[i], bits, group);
    }
  };
  const at::Tensor qkv = linear(at::layer_norm(x, {hidden}, norms[0], norms[1], eps), 0);
  const at::Tensor h = x + linear(decode_attention(qkv, k_cache, v_cache, pos, heads), 1);
  return h + linear(at::gelu(linear(at::layer_norm(h, {hidden}, norms[2], norms[3], eps), 2), "tanh"), 3);
}

}  // namespace cpmgen

TORCH_LIBRARY_FRAGMENT(cpmgen, m) {
  m.def("decode_block(Tensor x, Tensor[] norms, int kind, Tensor[] weights, Tensor[] gparams, Tensor[] scales, "
        "Tensor?[] biases, int[] out_features, int bits, int group, float eps, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor pos, int heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(cpmgen, CPU, m) { m.impl("decode_block", cpmgen::decode_block); }

// oneDNN packed weights are tensors of their own dispatch key: a call with them lands here.
TORCH_LIBRARY_IMPL(cpmgen, MkldnnCPU, m) { m.impl("decode_block", cpmgen::decode_block); }

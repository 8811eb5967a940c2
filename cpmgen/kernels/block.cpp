// A decode step's transformer block in one call (cpmgen/fused_decode.py): the ATen and cpmgen
// operations its modules run (model.Block over DecodeAttention, KernelGeluMLP and the block's
// linears), in the same order, so bitwise the same values, without a Python call for each of them.
//
// torch.classes.cpmgen.BlockStep holds a block's tensors, given once when it is made:
//   kind: what the four linears (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) are, the
//     same for all four:
//     "plain" nn.Linear: weights = their weights (at::linear, as F.linear)
//     "packed" prepack.PackedLinear: weights = their oneDNN packed weights (mkldnn::_linear_pointwise)
//     "quantized" quantize.QuantizedLinear: weights = packed int weights, with gparams, scales, bits, group
//     "gemv" prepack.GemvLinear: weights = their weights (gemv_linear)
//   norms: input_layernorm weight and bias, then post_attention_layernorm weight and bias
//   biases: the linears' biases; out_features: theirs; eps: the norms'; heads: the attention's
// and `forward(x [B, 1, hidden] fp32 or bf16, k_cache, v_cache, pos)` runs the step (the caches
// and positions as decode_attention takes them).
//
// With cpmgen's own linears (quantized, and the GEMV at up to its row limit) the whole block runs
// in one parallel region: the small serial pieces (layer norms, input quantization, GELU, the
// residual adds) on one thread between barriers, the linears and the attention split over all
// threads. Starting a parallel region for each operation instead, with the worker threads woken
// each time, cost more than the serial pieces themselves at one token. oneDNN and plain linears
// parallelize inside their own calls, so those blocks run the operations one after another.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <string>

#include "kernels.h"

namespace {

enum class Kind { kPlain, kPacked, kQuantized, kGemv };

constexpr double kOwnShare = 0.75;  // of a phase's units, split evenly; the rest go to whichever thread is free

// A step's intermediate values (see BlockStep::in_one_region).
struct Workspace {
  std::array<at::Tensor, 4> y;  // the four linears' outputs
  at::Tensor attention_out, h, gelu;
  std::array<cpmgen::QuantizedInput, 4> inputs;  // the quantized linears' inputs
};

// `buffer` as a [rows, cols] tensor of `options`, made anew only where it is not one already.
// Made outside inference mode: a tensor made inside it could not be written in place by a later
// step that runs outside it (under torch.no_grad, say).
at::Tensor& reuse(at::Tensor& buffer, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  if (!buffer.defined() || buffer.size(0) != rows || buffer.size(1) != cols ||
      buffer.scalar_type() != options.dtype().toScalarType()) {
    c10::InferenceMode not_inference(false);
    buffer = at::empty({rows, cols}, options);
  }
  return buffer;
}

Kind kind_named(const std::string& name) {
  if (name == "plain") return Kind::kPlain;
  if (name == "packed") return Kind::kPacked;
  if (name == "quantized") return Kind::kQuantized;
  TORCH_CHECK(name == "gemv", "BlockStep: unknown linear kind '", name, "' (plain, packed, quantized or gemv)");
  return Kind::kGemv;
}

struct BlockStep : torch::CustomClassHolder {
  Kind kind;
  std::vector<at::Tensor> norms, weights, gparams, scales;
  c10::List<c10::optional<at::Tensor>> biases;
  std::vector<int64_t> out_features;
  int64_t bits, group, heads;
  double eps;

  BlockStep(const std::string& kind_name, std::vector<at::Tensor> norms_, std::vector<at::Tensor> weights_,
            std::vector<at::Tensor> gparams_, std::vector<at::Tensor> scales_,
            c10::List<c10::optional<at::Tensor>> biases_, std::vector<int64_t> out_features_, int64_t bits_,
            int64_t group_, double eps_, int64_t heads_)
      : kind(kind_named(kind_name)), norms(std::move(norms_)), weights(std::move(weights_)),
        gparams(std::move(gparams_)), scales(std::move(scales_)), biases(std::move(biases_)),
        out_features(std::move(out_features_)), bits(bits_), group(group_), heads(heads_), eps(eps_) {
    TORCH_CHECK(norms.size() == 4 && weights.size() == 4 && biases.size() == 4 && out_features.size() == 4,
                "BlockStep: four norm tensors and four linears");
    TORCH_CHECK(kind != Kind::kQuantized || (gparams.size() == 4 && scales.size() == 4),
                "BlockStep: quantized linears need their gparams and scales");
  }

  at::Tensor forward(const at::Tensor& x, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& pos) {
    const int64_t rows = x.numel() / x.size(-1);
    if (kind == Kind::kQuantized || (kind == Kind::kGemv && rows <= cpmgen::kGemvMaxRows))
      return in_one_region(x, k_cache, v_cache, pos);
    return op_by_op(x, k_cache, v_cache, pos);
  }

  at::Tensor linear(const at::Tensor& in, size_t i) const {
    switch (kind) {
      case Kind::kPlain: return at::linear(in, weights[i], biases.get(i));
      case Kind::kPacked: return cpmgen::onednn_linear(in, weights[i], biases.get(i));
      case Kind::kGemv: return cpmgen::gemv_linear(in, weights[i], biases.get(i));
      default:
        return cpmgen::qlinear(in, weights[i], gparams[i], scales[i], biases.get(i), out_features[i], bits, group);
    }
  }

  at::Tensor op_by_op(const at::Tensor& x, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& pos) const {
    const int64_t hidden = x.size(-1);
    const at::Tensor qkv = linear(at::layer_norm(x, {hidden}, norms[0], norms[1], eps), 0);
    const at::Tensor h = x + linear(cpmgen::decode_attention(qkv, k_cache, v_cache, pos, heads), 1);
    at::Tensor up = linear(at::layer_norm(h, {hidden}, norms[2], norms[3], eps), 2);
    return h + linear(cpmgen::gelu_tanh_(up), 3);
  }

  at::Tensor in_one_region(const at::Tensor& x_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& pos) const {
    // Everything that checks (and so may throw) runs here, before the region.
    const int64_t hidden = x_in.size(-1);
    const at::Tensor x = x_in.reshape({-1, hidden}).contiguous();
    const int64_t rows = x.size(0);
    const bool quantized = kind == Kind::kQuantized;
    const std::array<int64_t, 4> in_features{hidden, out_features[0] / 3, hidden, out_features[2]};
    std::array<cpmgen::QuantizedWeight, 4> qweight;
    // The step's intermediate values go into buffers each calling thread keeps from one step to
    // the next (new tensors for them, every block of every step, cost more than the small
    // operations that fill them). Nothing in them outlives the call: it returns a new tensor.
    // Taken by reference here: inside the region the name would be each worker thread's own instance.
    thread_local Workspace caller_workspace;
    Workspace& work = caller_workspace;
    std::array<int64_t, 4> units;
    std::array<at::Tensor, 4> gemv_inputs;  // the linears' inputs as gemv_rows reads them
    for (size_t i = 0; i < 4; ++i) {
      if (quantized) {
        qweight[i] = cpmgen::quantized_weight(weights[i], gparams[i], scales[i], biases.get(i), out_features[i], bits,
                                              group);
        TORCH_CHECK(in_features[i] <= qweight[i].k, "BlockStep: linear ", i, " takes ", qweight[i].k, " features, not ",
                    in_features[i]);
        units[i] = qweight[i].blocks;
      } else {
        TORCH_CHECK(weights[i].scalar_type() == x.scalar_type(), "BlockStep: x must be in the weights' dtype");
        units[i] = cpmgen::gemv_units(weights[i], biases.get(i), in_features[i]);
      }
      reuse(work.y[i], rows, out_features[i], x.options());
    }
    std::array<at::Tensor, 4>& y = work.y;
    cpmgen::AttentionStep attention =
        cpmgen::attention_step(y[0], k_cache, v_cache, pos, heads, reuse(work.attention_out, rows, in_features[1], x.options()));
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    if (!bf16) cpmgen::attention_input(attention, y[0]);  // fp32: y[0] itself, filled in below
    const at::Tensor& attention_out = work.attention_out;
    at::Tensor& h = reuse(work.h, rows, hidden, x.options());
    at::Tensor& gelu = reuse(work.gelu, rows, out_features[2], x.options());
    at::Tensor ln;
    // Each thread runs a contiguous part of a phase's units (one long read of the weights, which
    // the hardware prefetchers follow), then takes the rest a small chunk at a time from the
    // phase's counter: a thread that gets ahead (the other one started later or was slowed by
    // the machine) runs more of them instead of waiting at the barrier. Which thread runs a unit
    // does not change its values.
    std::array<std::atomic<int64_t>, 5> next{};  // the four linears, then the attention

#pragma omp parallel num_threads(at::get_num_threads())
    {
      const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
      const bool first = thread == 0;
      auto share = [&](std::atomic<int64_t>& counter, int64_t count, auto&& run) {
        const int64_t own = count * kOwnShare / threads, taken = own * threads;
        if (own > 0) run(thread * own, (thread + 1) * own);
        const int64_t chunk = std::max<int64_t>(1, (count - taken) / (4 * threads));
        for (int64_t begin; (begin = taken + counter.fetch_add(chunk, std::memory_order_relaxed)) < count;)
          run(begin, std::min(begin + chunk, count));
      };
      // One thread readies linear i's input, then every thread runs output units of it.
      auto linear_on_all = [&](size_t i, const at::Tensor& in) {
        if (first) {
          if (quantized) {
            cpmgen::quantize_input(qweight[i], in, work.inputs[i], /*parallel=*/false);
          } else {
            gemv_inputs[i] = cpmgen::gemv_input(in, weights[i]);
          }
        }
#pragma omp barrier
        share(next[i], units[i], [&](int64_t begin, int64_t end) {
          if (quantized) {
            cpmgen::qlinear_blocks(qweight[i], work.inputs[i], y[i], begin, end);
          } else {
            cpmgen::gemv_rows(gemv_inputs[i], weights[i], biases.get(i), y[i], begin, end);
          }
        });
#pragma omp barrier
      };

      if (first) ln = at::layer_norm(x, {hidden}, norms[0], norms[1], eps);
      linear_on_all(0, ln);
      if (bf16) {
        if (first) cpmgen::attention_input(attention, y[0]);
#pragma omp barrier
      }
      share(next[4], attention.units(), [&](int64_t begin, int64_t end) { cpmgen::attention_units(attention, begin, end); });
#pragma omp barrier
      linear_on_all(1, attention_out);
      if (first) {
        at::add_out(h, x, y[1]);
        ln = at::layer_norm(h, {hidden}, norms[2], norms[3], eps);
      }
      linear_on_all(2, ln);
      if (first) cpmgen::gelu_tanh_rows(y[2], gelu);
      linear_on_all(3, gelu);
    }
    return (h + y[3]).view(x_in.sizes());
  }
};

// The one-token step of a model's blocks, each BlockStep in turn, in one call: from Python, a
// call for each block cost more than some blocks' own work at one token (the custom class's
// call, the module's) and made a tensor for each block's output.
struct StackStep : torch::CustomClassHolder {
  std::vector<c10::intrusive_ptr<BlockStep>> blocks;

  explicit StackStep(std::vector<c10::intrusive_ptr<BlockStep>> blocks_) : blocks(std::move(blocks_)) {}

  at::Tensor forward(const at::Tensor& x_in, const std::vector<at::Tensor>& k_caches,
                     const std::vector<at::Tensor>& v_caches, const at::Tensor& pos) const {
    TORCH_CHECK(k_caches.size() == blocks.size() && v_caches.size() == blocks.size(),
                "StackStep: one key and one value cache per block");
    at::Tensor x = x_in;
    for (size_t i = 0; i < blocks.size(); ++i) x = blocks[i]->forward(x, k_caches[i], v_caches[i], pos);
    return x;
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(cpmgen, m) {
  m.class_<BlockStep>("BlockStep")
      .def(torch::init<std::string, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, c10::List<c10::optional<at::Tensor>>, std::vector<int64_t>, int64_t,
                       int64_t, double, int64_t>())
      .def("forward", &BlockStep::forward);
  m.class_<StackStep>("StackStep")
      .def(torch::init<std::vector<c10::intrusive_ptr<BlockStep>>>())
      .def("forward", &StackStep::forward);
}

// A decode step's transformer blocks in one call (cpmgen/fused_decode.py): the ATen and cpmgen
// operations their modules run (model.Block over KernelLayerNorm, DecodeAttention, KernelGeluMLP
// and the block's linears), in the same order, so bitwise the same values, without a Python call
// for each of them.
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
// and positions as decode_attention takes them). torch.classes.cpmgen.StackStep holds a model's
// BlockSteps and runs their steps one after the other: `forward(x, k_caches, v_caches, pos)`.
// torch.classes.cpmgen.ModelStep holds a model's embedding tables, its StackStep, the final layer
// norm and the output layer (a linear of its own kind, without bias), and runs a whole one-token
// step: `forward(ids, pos, k_caches, v_caches)` -> logits [B, vocab], the rows of the word and
// position tables added as the model adds them, then the blocks, the norm and the output layer.
//
// With cpmgen's own linears (quantized, and the GEMV at up to its row limit) all the blocks of a
// call run in one parallel region (run_in_one_region), and the output layer too where it is one of
// those. oneDNN and plain linears parallelize inside their own calls, so those blocks (or that
// output layer) run the operations one after another.

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

// A step's intermediate values (see run_in_one_region), the same for every block of a stack.
struct Workspace {
  std::array<at::Tensor, 4> y;  // the four linears' outputs
  at::Tensor ln, attention_out, qkv_f32, gelu;
  std::array<cpmgen::QuantizedInput, 5> inputs;  // the quantized linears' inputs, then the output layer's
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

// Calls run(T{}) with T the element type of `t`: float or at::BFloat16.
template <typename Run>
void as_float_type(const at::Tensor& t, Run&& run) {
  if (t.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    run(at::BFloat16{});
  }
}

// out[i] = a[i] + b[i] for n values (fp32, or bf16 summed in fp32 and rounded once: the bits of
// at::add, which the modules' residual adds and their sum of the two embeddings run).
template <typename T>
void add_values(const T* a, const T* b, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(cpmgen::widen(a[i]) + cpmgen::widen(b[i]));
}

// residual += add, in place.
void add_into(at::Tensor& residual, const at::Tensor& add) {
  as_float_type(residual, [&](auto zero) {
    using T = decltype(zero);
    add_values(residual.data_ptr<T>(), add.data_ptr<T>(), residual.data_ptr<T>(), residual.numel());
  });
}

// One linear: its kind and tensors (gparams and scale for quantized ones only).
struct Linear {
  Kind kind;
  at::Tensor weight, gparams, scale;
  c10::optional<at::Tensor> bias;
  int64_t out_features, bits, group;

  // Whether a step of `rows` input rows runs it inside a parallel region (cpmgen's own linears).
  bool in_one_region(int64_t rows) const {
    return kind == Kind::kQuantized || (kind == Kind::kGemv && rows <= cpmgen::kGemvMaxRows);
  }

  at::Tensor run(const at::Tensor& in) const {
    switch (kind) {
      case Kind::kPlain: return at::linear(in, weight, bias);
      case Kind::kPacked: return cpmgen::onednn_linear(in, weight, bias);
      case Kind::kGemv: return cpmgen::gemv_linear(in, weight, bias);
      default: return cpmgen::qlinear(in, weight, gparams, scale, bias, out_features, bits, group);
    }
  }
};

// A model's output layer: the final layer norm, then the linear to the vocabulary.
struct Head {
  at::Tensor norm_weight, norm_bias;
  double eps;
  Linear linear;
};

struct BlockStep;
at::Tensor run_blocks(const std::vector<const BlockStep*>& blocks, const at::Tensor& x,
                      const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                      const at::Tensor& pos, const Head* head = nullptr);

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
    return run_blocks({this}, x, {k_cache}, {v_cache}, pos);
  }

  // Whether its one-token step runs in one parallel region: cpmgen's own linears (quantized, and
  // the GEMV at up to its row limit).
  bool in_one_region(int64_t rows) const { return linear_at(0).in_one_region(rows); }

  // Blocks that can share one region's buffers: the same kind and shapes.
  bool same_shape(const BlockStep& other) const {
    return kind == other.kind && out_features == other.out_features && bits == other.bits && group == other.group &&
           heads == other.heads;
  }

  at::Tensor layer_norm(const at::Tensor& x, size_t i) const {
    return cpmgen::layer_norm(x, norms[2 * i], norms[2 * i + 1], eps);
  }

  Linear linear_at(size_t i) const {
    const bool quantized = kind == Kind::kQuantized;
    return Linear{kind, weights[i], quantized ? gparams[i] : at::Tensor(), quantized ? scales[i] : at::Tensor(),
                  biases.get(i), out_features[i], bits, group};
  }

  at::Tensor linear(const at::Tensor& in, size_t i) const { return linear_at(i).run(in); }

  at::Tensor op_by_op(const at::Tensor& x, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& pos) const {
    const at::Tensor qkv = linear(layer_norm(x, 0), 0);
    const at::Tensor h = x + linear(cpmgen::decode_attention(qkv, k_cache, v_cache, pos, heads), 1);
    at::Tensor up = linear(layer_norm(h, 1), 2);
    return h + linear(cpmgen::gelu_tanh_(up), 3);
  }
};

// One linear, checked and set up for the region.
struct LinearPlan {
  const Linear* linear = nullptr;
  cpmgen::QuantizedWeight qweight;  // quantized
  int64_t units = 0;
  bool quantized() const { return linear->kind == Kind::kQuantized; }
};

LinearPlan plan_linear(const Linear& linear, const char* name, int64_t in_features, const at::Tensor& x) {
  LinearPlan plan;
  plan.linear = &linear;
  if (linear.kind == Kind::kQuantized) {
    plan.qweight = cpmgen::quantized_weight(linear.weight, linear.gparams, linear.scale, linear.bias,
                                            linear.out_features, linear.bits, linear.group);
    TORCH_CHECK(in_features <= plan.qweight.k, "BlockStep: ", name, " takes ", plan.qweight.k, " features, not ",
                in_features);
    plan.units = plan.qweight.blocks;
  } else {
    TORCH_CHECK(linear.weight.scalar_type() == x.scalar_type(), "BlockStep: x must be in the weights' dtype");
    plan.units = cpmgen::gemv_units(linear.weight, linear.bias, in_features);
  }
  return plan;
}

// The one-token steps of `blocks` (each with in_one_region true, all of the same shape) in one
// parallel region: the small serial pieces (layer norms, input quantization, GELU, the residual
// adds) on one thread between barriers, the linears and the attention split over all threads.
// Starting a parallel region for each operation, or each block, with the worker threads woken
// each time, cost more than the serial pieces themselves at one token. With `head` (its linear
// one that runs in a region), the final layer norm and the output layer follow in the same region
// and the logits are returned; without, the blocks' output.
at::Tensor run_in_one_region(const std::vector<const BlockStep*>& blocks, const at::Tensor& x_in,
                             const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                             const at::Tensor& pos, const Head* head) {
  // Everything that checks (and so may throw) runs here, before the region.
  const BlockStep& shape = *blocks.front();
  const int64_t hidden = x_in.size(-1);
  const at::Tensor x = x_in.reshape({-1, hidden});
  const int64_t rows = x.size(0);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const std::array<int64_t, 4> in_features{hidden, shape.out_features[0] / 3, hidden, shape.out_features[2]};
  // The step's intermediate values go into buffers each calling thread keeps from one step to
  // the next (new tensors for them, every block of every step, cost more than the small
  // operations that fill them). Nothing in them outlives the call: the residual stream, which
  // each block adds to in place, is a new tensor, the one returned (or the logits are).
  // Taken by reference here: inside the region the name would be each worker thread's own instance.
  thread_local Workspace caller_workspace;
  Workspace& work = caller_workspace;
  std::array<at::Tensor, 4>& y = work.y;
  for (size_t i = 0; i < 4; ++i) reuse(y[i], rows, shape.out_features[i], x.options());
  at::Tensor& ln = reuse(work.ln, rows, hidden, x.options());
  at::Tensor& gelu = reuse(work.gelu, rows, shape.out_features[2], x.options());
  const at::Tensor& attention_out = reuse(work.attention_out, rows, in_features[1], x.options());
  const at::Tensor qkv_f32 = bf16 ? reuse(work.qkv_f32, rows, shape.out_features[0], x.options().dtype(at::kFloat))
                                  : at::Tensor();
  at::Tensor residual = x.clone(at::MemoryFormat::Contiguous);
  const at::Tensor positions = cpmgen::decode_positions(pos, k_caches.front().size(0), k_caches.front().size(2));
  std::vector<std::array<Linear, 4>> block_linears(blocks.size());
  std::vector<std::array<LinearPlan, 4>> linears(blocks.size());
  std::vector<cpmgen::AttentionStep> attention(blocks.size());
  static const std::array<const char*, 4> names{"linear 0", "linear 1", "linear 2", "linear 3"};
  for (size_t b = 0; b < blocks.size(); ++b) {
    const BlockStep& block = *blocks[b];
    for (size_t i = 0; i < 4; ++i) {
      block_linears[b][i] = block.linear_at(i);
      linears[b][i] = plan_linear(block_linears[b][i], names[i], in_features[i], x);
    }
    for (size_t i = 0; i < 4; i += 2) cpmgen::check_layer_norm(residual, block.norms[i], block.norms[i + 1], ln);
    attention[b] = cpmgen::attention_step(y[0], k_caches[b], v_caches[b], positions, block.heads, attention_out, qkv_f32);
  }
  LinearPlan head_plan;
  at::Tensor logits;
  if (head) {
    head_plan = plan_linear(head->linear, "the output layer", hidden, x);
    cpmgen::check_layer_norm(residual, head->norm_weight, head->norm_bias, ln);
    logits = at::empty({rows, head->linear.out_features}, x.options());
  }
  // Each phase's units are shared out by cpmgen::share_units (an own part per thread, then chunks
  // from the phase's counter): per block the four linears, then the attention; then the head.
  std::vector<std::atomic<int64_t>> next(blocks.size() * 5 + 1);
  for (auto& counter : next) counter.store(0, std::memory_order_relaxed);
  std::array<cpmgen::QuantizedInput, 5>& inputs = work.inputs;
  std::array<at::Tensor, 5> gemv_inputs;  // the GEMV linears' inputs as gemv_rows reads them

#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    const bool first = thread == 0;
    // One thread readies a linear's input `in` (after `serial`, the work that makes it), then
    // every thread runs units of it into `out`; `slot` picks its input buffers.
    auto linear_on_all = [&](const LinearPlan& plan, size_t slot, std::atomic<int64_t>& counter, const at::Tensor& in,
                             at::Tensor& out, auto&& serial) {
      const Linear& linear = *plan.linear;
      if (first) {
        serial();
        if (plan.quantized()) {
          cpmgen::quantize_input(plan.qweight, in, inputs[slot], /*parallel=*/false);
        } else {
          gemv_inputs[slot] = cpmgen::gemv_input(in, linear.weight);
        }
      }
#pragma omp barrier
      cpmgen::share_units(counter, plan.units, threads, thread, [&](int64_t begin, int64_t end) {
        if (plan.quantized()) {
          cpmgen::qlinear_blocks(plan.qweight, inputs[slot], out, begin, end);
        } else {
          cpmgen::gemv_rows(gemv_inputs[slot], linear.weight, linear.bias, out, begin, end);
        }
      });
#pragma omp barrier
    };
    for (size_t b = 0; b < blocks.size(); ++b) {
      const BlockStep& block = *blocks[b];
      const std::array<LinearPlan, 4>& plans = linears[b];
      std::atomic<int64_t>* counters = &next[5 * b];
      linear_on_all(plans[0], 0, counters[0], ln, y[0], [&] {
        if (b > 0) add_into(residual, y[3]);  // the block before's MLP
        cpmgen::layer_norm_rows(residual, block.norms[0], block.norms[1], block.eps, ln, 0, rows);
      });
      if (bf16) {
        if (first) cpmgen::attention_input(attention[b], y[0]);
#pragma omp barrier
      }
      cpmgen::share_units(counters[4], attention[b].units(), threads, thread,
                          [&](int64_t begin, int64_t end) { cpmgen::attention_units(attention[b], begin, end); });
#pragma omp barrier
      linear_on_all(plans[1], 1, counters[1], attention_out, y[1], [] {});
      linear_on_all(plans[2], 2, counters[2], ln, y[2], [&] {
        add_into(residual, y[1]);
        cpmgen::layer_norm_rows(residual, block.norms[2], block.norms[3], block.eps, ln, 0, rows);
      });
      linear_on_all(plans[3], 3, counters[3], gelu, y[3], [&] { cpmgen::gelu_tanh_rows(y[2], gelu); });
    }
    if (head) {
      linear_on_all(head_plan, 4, next.back(), ln, logits, [&] {
        add_into(residual, y[3]);
        cpmgen::layer_norm_rows(residual, head->norm_weight, head->norm_bias, head->eps, ln, 0, rows);
      });
    } else if (first) {
      add_into(residual, y[3]);
    }
  }
  return head ? logits : residual.view(x_in.sizes());
}

// The blocks' one-token steps (then, with `head`, the final layer norm and the output layer: the
// logits [rows, vocab]), in one parallel region where every linear is one that runs there.
at::Tensor run_blocks(const std::vector<const BlockStep*>& blocks, const at::Tensor& x,
                      const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                      const at::Tensor& pos, const Head* head) {
  TORCH_CHECK(!blocks.empty() && k_caches.size() == blocks.size() && v_caches.size() == blocks.size(),
              "StackStep: one key and one value cache per block");
  const int64_t rows = x.numel() / x.size(-1);
  bool one_region = !head || head->linear.in_one_region(rows);
  for (const BlockStep* block : blocks)
    one_region = one_region && block->in_one_region(rows) && block->same_shape(*blocks.front());
  if (one_region) return run_in_one_region(blocks, x, k_caches, v_caches, pos, head);
  at::Tensor out = x;
  for (size_t i = 0; i < blocks.size(); ++i) out = blocks[i]->op_by_op(out, k_caches[i], v_caches[i], pos);
  if (!head) return out;
  return head->linear.run(cpmgen::layer_norm(out, head->norm_weight, head->norm_bias, head->eps)).view({rows, -1});
}

// The one-token step of a model's blocks, each BlockStep in turn, in one call: from Python, a
// call for each block cost more than some blocks' own work at one token (the custom class's
// call, the module's) and made a tensor for each block's output; in one parallel region the
// worker threads also stay in it from one block to the next.
struct StackStep : torch::CustomClassHolder {
  std::vector<c10::intrusive_ptr<BlockStep>> blocks;
  std::vector<const BlockStep*> steps;

  explicit StackStep(std::vector<c10::intrusive_ptr<BlockStep>> blocks_) : blocks(std::move(blocks_)) {
    for (const auto& block : blocks) steps.push_back(block.get());
  }

  at::Tensor forward(const at::Tensor& x, const std::vector<at::Tensor>& k_caches,
                     const std::vector<at::Tensor>& v_caches, const at::Tensor& pos) const {
    return run_blocks(steps, x, k_caches, v_caches, pos);
  }
};

// x [batch, 1, hidden]: word[ids[b]] + position[positions[b]] for each row, in the tables' dtype
// (add_values: the bits of the model's sum of the two lookups).
void embed_rows(const at::Tensor& word, const at::Tensor& position, const int64_t* ids, const int64_t* positions,
                at::Tensor& x) {
  const int64_t hidden = word.size(1);
  as_float_type(x, [&](auto zero) {
    using T = decltype(zero);
    for (int64_t b = 0; b < x.size(0); ++b)
      add_values(word.data_ptr<T>() + ids[b] * hidden, position.data_ptr<T>() + positions[b] * hidden,
                 x.data_ptr<T>() + b * hidden, hidden);
  });
}

// A model's whole one-token step (see the top of the file): made once from its tables, its
// StackStep and its output layer.
struct ModelStep : torch::CustomClassHolder {
  at::Tensor word, position;
  c10::intrusive_ptr<StackStep> stack;
  Head head;

  ModelStep(at::Tensor word_, at::Tensor position_, c10::intrusive_ptr<StackStep> stack_, at::Tensor norm_weight,
            at::Tensor norm_bias, double eps, const std::string& head_kind, at::Tensor head_weight,
            at::Tensor head_gparams, at::Tensor head_scale, int64_t vocab, int64_t bits, int64_t group)
      : word(std::move(word_)), position(std::move(position_)), stack(std::move(stack_)),
        head{std::move(norm_weight), std::move(norm_bias), eps,
             Linear{kind_named(head_kind), std::move(head_weight), std::move(head_gparams), std::move(head_scale),
                    c10::nullopt, vocab, bits, group}} {
    TORCH_CHECK(word.dim() == 2 && position.dim() == 2 && word.size(1) == position.size(1) && word.is_contiguous() &&
                    position.is_contiguous() && word.scalar_type() == position.scalar_type() &&
                    (word.scalar_type() == at::kFloat || word.scalar_type() == at::kBFloat16),
                "ModelStep: contiguous fp32 or bf16 word and position tables of one width and dtype");
    TORCH_CHECK(!stack->steps.empty(), "ModelStep: a stack of at least one block");
  }

  // ids [batch] or [batch, 1]; pos as decode_attention takes it -> logits [batch, vocab].
  at::Tensor forward(const at::Tensor& ids_in, const at::Tensor& pos, const std::vector<at::Tensor>& k_caches,
                     const std::vector<at::Tensor>& v_caches) const {
    const at::Tensor ids = ids_in.to(at::kLong).reshape(-1).contiguous();
    const int64_t batch = ids.numel(), vocab = word.size(0);
    TORCH_CHECK(!k_caches.empty() && k_caches.front().size(0) == batch, "ModelStep: one cache row per id");
    const at::Tensor positions = cpmgen::decode_positions(pos, batch, k_caches.front().size(2));
    const int64_t* id = ids.data_ptr<int64_t>();
    const int64_t* p = positions.data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(id[b] >= 0 && id[b] < vocab, "ModelStep: token id ", id[b], " outside the vocabulary's 0..", vocab - 1);
      TORCH_CHECK(p[b] < position.size(0), "ModelStep: position ", p[b], " outside the model's 0..", position.size(0) - 1);
    }
    at::Tensor x = at::empty({batch, 1, word.size(1)}, word.options());  // as the blocks take it
    embed_rows(word, position, id, p, x);
    return run_blocks(stack->steps, x, k_caches, v_caches, positions, &head);
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
  m.class_<ModelStep>("ModelStep")
      .def(torch::init<at::Tensor, at::Tensor, c10::intrusive_ptr<StackStep>, at::Tensor, at::Tensor, double,
                       std::string, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t, int64_t>())
      .def("forward", &ModelStep::forward);
}

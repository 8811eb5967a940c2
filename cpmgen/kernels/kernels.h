// The ops the kernel sources share (each is also registered as torch.ops.cpmgen.<name>).
#pragma once

#include <ATen/ATen.h>

namespace cpmgen {

// qlinear.cpp: x [..., in_features] -> x @ W^T + b for int8 or int4 weights in the packed layout.
at::Tensor qlinear(const at::Tensor& input, const at::Tensor& packed, const at::Tensor& gparams, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& bias, int64_t n, int64_t bits, int64_t group);

// attention.cpp: a decode step's attention (the key and value written into the cache first).
at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& pos, int64_t heads);

// gemv.cpp: fp32 x @ W^T + b, W as nn.Linear holds it; a few rows read W once at memory speed.
at::Tensor gemv_linear(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

}  // namespace cpmgen

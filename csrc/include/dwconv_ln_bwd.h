// What every dwconv_ln_bwd kernel (CPU, CUDA) shares: the input contract and the outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "checks.h"

namespace convnext_fast {

// grad_y, x [N, C, H, W] channels_last, same dtype; conv_weight [C, 1, k, k] odd k; conv_bias
// (optional), ln_weight [C] in x's dtype; mean, rstd fp32 [N, H, W] contiguous. Returns k.
inline int64_t check_dwconv_ln_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                   const at::Tensor& conv_weight,
                                   const std::optional<at::Tensor>& conv_bias,
                                   const at::Tensor& ln_weight, const at::Tensor& mean,
                                   const at::Tensor& rstd) {
  constexpr const char* op = "dwconv_ln_bwd";
  CNF_CHECK_NHWC("dwconv_ln_bwd", "x", x);
  CNF_CHECK_NHWC("dwconv_ln_bwd", "grad_y", grad_y);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have x's shape ", x.sizes(),
              ", got ", grad_y.sizes());
  CNF_CHECK_SAME("dwconv_ln_bwd", "grad_y", grad_y, x);
  const int64_t C = x.size(1);
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(0) == C && conv_weight.size(1) == 1 &&
                  conv_weight.size(2) == conv_weight.size(3) && conv_weight.size(2) % 2 == 1,
              op, ": conv_weight must have shape [C, 1, k, k] = [", C,
              ", 1, k, k] with odd k, got ", conv_weight.sizes());
  CNF_CHECK_SAME("dwconv_ln_bwd", "conv_weight", conv_weight, x);
  if (conv_bias.has_value()) {
    CNF_CHECK_VEC("dwconv_ln_bwd", "conv_bias", (*conv_bias), x, C);
  }
  CNF_CHECK_VEC("dwconv_ln_bwd", "ln_weight", ln_weight, x, C);
  for (const at::Tensor* s : {&mean, &rstd}) {
    const char* name = s == &mean ? "mean" : "rstd";
    TORCH_CHECK(s->dim() == 3 && s->size(0) == x.size(0) && s->size(1) == x.size(2) &&
                    s->size(2) == x.size(3),
                op, ": ", name, " must have shape [N, H, W] = [", x.size(0), ", ", x.size(2), ", ",
                x.size(3), "], got ", s->sizes());
    TORCH_CHECK(s->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                s->scalar_type());
    TORCH_CHECK(s->device() == x.device(), op, ": ", name, " is on ", s->device(),
                " but x is on ", x.device());
  }
  return conv_weight.size(2);
}

// (dx channels_last in x's dtype, d_conv_weight [C, 1, k, k], d_conv_bias [C] (conv_bias's
// dtype, else conv_weight's), d_ln_weight, d_ln_bias [C] in ln_weight's dtype), NaN-poisoned
// when poison_outputs().
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_ln_bwd_outputs(
    const at::Tensor& x, const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    const at::Tensor& ln_weight) {
  auto dx = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto dw = at::empty_like(conv_weight, at::MemoryFormat::Contiguous);
  auto db = at::empty({x.size(1)}, (conv_bias.has_value() ? *conv_bias : conv_weight).options());
  auto dlw = at::empty({x.size(1)}, ln_weight.options());
  auto dlb = at::empty({x.size(1)}, ln_weight.options());
  if (poison_outputs()) {
    for (at::Tensor* t : {&dx, &dw, &db, &dlw, &dlb}) t->fill_(NAN);
  }
  return {dx, dw, db, dlw, dlb};
}

}  // namespace convnext_fast

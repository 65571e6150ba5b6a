// What every dwconv_ln kernel (CPU, CUDA) shares: the input contract and the outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "checks.h"

namespace convnext_fast {

// x [N, C, H, W] channels_last; conv_weight [C, 1, k, k] with odd k; conv_bias (optional),
// ln_weight, ln_bias [C]; all on x's device with x's dtype. Returns k.
inline int64_t check_dwconv_ln(const at::Tensor& x, const at::Tensor& conv_weight,
                               const std::optional<at::Tensor>& conv_bias,
                               const at::Tensor& ln_weight, const at::Tensor& ln_bias) {
  CNF_CHECK_NHWC("dwconv_ln", "x", x);
  const int64_t C = x.size(1);
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(0) == C && conv_weight.size(1) == 1 &&
                  conv_weight.size(2) == conv_weight.size(3) && conv_weight.size(2) % 2 == 1,
              "dwconv_ln: conv_weight must have shape [C, 1, k, k] = [", C,
              ", 1, k, k] with odd k, got ", conv_weight.sizes());
  CNF_CHECK_SAME("dwconv_ln", "conv_weight", conv_weight, x);
  if (conv_bias.has_value()) {
    CNF_CHECK_VEC("dwconv_ln", "conv_bias", (*conv_bias), x, C);
  }
  CNF_CHECK_VEC("dwconv_ln", "ln_weight", ln_weight, x, C);
  CNF_CHECK_VEC("dwconv_ln", "ln_bias", ln_bias, x, C);
  return conv_weight.size(2);
}

// The conv output of one pixel in fp64 with plain loops (the fp64 paths, kept for gradcheck):
// out[c] = b[c] + sum over the in-image taps of x[n, h + kh - k/2, wi + kw - k/2, c] * w[c, kh, kw],
// x NHWC, w [C, k, k], b [C] or null.
template <typename scalar_t>
inline void dwconv_pixel_fp64(const scalar_t* x, const scalar_t* w, const scalar_t* b, int64_t n,
                              int64_t h, int64_t wi, int64_t H, int64_t W, int64_t C, int64_t k,
                              double* out) {
  const int64_t p = k / 2;
  for (int64_t c = 0; c < C; ++c) out[c] = b != nullptr ? b[c] : 0.0;
  for (int64_t kh = 0; kh < k; ++kh) {
    const int64_t ih = h + kh - p;
    if (ih < 0 || ih >= H) continue;
    for (int64_t kw = 0; kw < k; ++kw) {
      const int64_t iw = wi + kw - p;
      if (iw < 0 || iw >= W) continue;
      const scalar_t* row = x + ((n * H + ih) * W + iw) * C;
      for (int64_t c = 0; c < C; ++c) out[c] += row[c] * w[(c * k + kh) * k + kw];
    }
  }
}

// y (channels_last, x's dtype) and the per-pixel fp32 mean and rstd [N, H, W].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_ln_outputs(const at::Tensor& x) {
  auto y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto stat_opts = x.options().dtype(at::kFloat);
  auto mean = at::empty({x.size(0), x.size(2), x.size(3)}, stat_opts);
  auto rstd = at::empty({x.size(0), x.size(2), x.size(3)}, stat_opts);
  if (poison_outputs()) {
    y.fill_(NAN);
    mean.fill_(NAN);
    rstd.fill_(NAN);
  }
  return {y, mean, rstd};
}

}  // namespace convnext_fast

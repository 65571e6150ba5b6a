// dwconv_ln forward on the CPU: depthwise kxk conv ('same' padding, stride 1) + bias, then
// LayerNorm over C, for channels_last (NHWC) tensors.
//
// Work is split over output rows (n, h) with at::parallel_for. The k input rows an output row
// needs are widened to fp32 in a zero-padded ring of rows (cpu::RowWindow: one new row per output
// row; blocked by channel vector for k in {3, 5, 7}), so the tap loop has no bounds checks,
// streams through memory and reads fp32 whatever the input dtype. The conv
// (cpu::conv_row, register-blocked along W) writes one output row ([W, C] fp32) to a per-thread
// scratch buffer, normalised right away: the conv output never touches memory.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../include/cpu_vec.h"
#include "../include/derived_cache.h"
#include "../include/dwconv_ln.h"

namespace convnext_fast {
namespace {

using cpu::Vec;
using cpu::narrow;
using cpu::widen;

// The per-pixel reductions keep four vector accumulators: one would chain every add on the
// previous one (FMA latency, not throughput, would bound them).
inline float row_sum(const float* a, int64_t C) {
  Vec s0(0.f), s1(0.f), s2(0.f), s3(0.f);
  constexpr int64_t V = Vec::size();
  int64_t c = 0;
  for (; c + 4 * V <= C; c += 4 * V) {
    s0 = s0 + Vec::loadu(a + c);
    s1 = s1 + Vec::loadu(a + c + V);
    s2 = s2 + Vec::loadu(a + c + 2 * V);
    s3 = s3 + Vec::loadu(a + c + 3 * V);
  }
  for (; c + V <= C; c += V) s0 = s0 + Vec::loadu(a + c);
  float total = at::vec::vec_reduce_all<float>(std::plus<Vec>(), (s0 + s1) + (s2 + s3));
  for (; c < C; ++c) total += a[c];
  return total;
}

// Sum of squares of a[c] - mu (two-pass variance: exact for large means, unlike E[x^2]-E[x]^2).
inline float centered_sumsq(const float* a, float mu, int64_t C) {
  const Vec m(mu);
  Vec s0(0.f), s1(0.f), s2(0.f), s3(0.f);
  constexpr int64_t V = Vec::size();
  int64_t c = 0;
  for (; c + 4 * V <= C; c += 4 * V) {
    const Vec d0 = Vec::loadu(a + c) - m, d1 = Vec::loadu(a + c + V) - m;
    const Vec d2 = Vec::loadu(a + c + 2 * V) - m, d3 = Vec::loadu(a + c + 3 * V) - m;
    s0 = at::vec::fmadd(d0, d0, s0);
    s1 = at::vec::fmadd(d1, d1, s1);
    s2 = at::vec::fmadd(d2, d2, s2);
    s3 = at::vec::fmadd(d3, d3, s3);
  }
  for (; c + V <= C; c += V) {
    const Vec d = Vec::loadu(a + c) - m;
    s0 = at::vec::fmadd(d, d, s0);
  }
  float total = at::vec::vec_reduce_all<float>(std::plus<Vec>(), (s0 + s1) + (s2 + s3));
  for (; c < C; ++c) total += (a[c] - mu) * (a[c] - mu);
  return total;
}

// out[c] = (a[c] - mu) * rstd * w[c] + b[c]; fp32 out is written directly, other dtypes through a.
template <typename scalar_t>
inline void normalize(float* a, float mu, float rstd, const float* w, const float* b,
                      scalar_t* out, int64_t C) {
  float* dst;
  if constexpr (std::is_same_v<scalar_t, float>) {
    dst = out;
  } else {
    dst = a;
  }
  const Vec m(mu), r(rstd);
  int64_t c = 0;
  for (; c + Vec::size() <= C; c += Vec::size()) {
    at::vec::fmadd((Vec::loadu(a + c) - m) * r, Vec::loadu(w + c), Vec::loadu(b + c)).store(dst + c);
  }
  for (; c < C; ++c) dst[c] = (a[c] - mu) * rstd * w[c] + b[c];
  if constexpr (!std::is_same_v<scalar_t, float>) narrow(a, out, C);
}

template <typename scalar_t>
void dwconv_ln_cpu_kernel(const scalar_t* x, const float* w_taps, const float* conv_bias,
                          const float* ln_w, const float* ln_b, scalar_t* y, float* mean_out,
                          float* rstd_out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t k,
                          double eps) {
  const int64_t p = k / 2;
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    cpu::RowWindow window(k, W, C, cpu::conv_blocked(k));
    const cpu::ConvLayout layout = window.layout();
    const cpu::ThreadScratch acc_row(W * C);
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      const float* rows = window.rows(x, n, h, H);
      // Rows outside the image contribute nothing: restrict kh instead of testing every tap.
      const int64_t kh_lo = std::max<int64_t>(0, p - h);
      const int64_t kh_hi = std::min<int64_t>(k, H + p - h);
      cpu::conv_row(acc_row.data(), rows, layout, w_taps, conv_bias, C, W, k, kh_lo, kh_hi);
      for (const auto w : c10::irange(W)) {
        float* acc = acc_row.data() + w * C;
        const float muf = row_sum(acc, C) / C;
        const float var = centered_sumsq(acc, muf, C) / C;
        const float rstdf = 1.f / std::sqrt(var + static_cast<float>(eps));
        normalize(acc, muf, rstdf, ln_w, ln_b, y + (nh * W + w) * C, C);
        mean_out[nh * W + w] = muf;
        rstd_out[nh * W + w] = rstdf;
      }
    }
  });
}

// fp64 keeps its own precision end to end (for gradcheck); everything else computes in fp32.
template <typename scalar_t>
void dwconv_ln_cpu_fp64(const scalar_t* x, const scalar_t* w, const scalar_t* b, const scalar_t* lw,
                        const scalar_t* lb, scalar_t* y, float* mean_out, float* rstd_out,
                        int64_t N, int64_t C, int64_t H, int64_t W, int64_t k, double eps) {
  at::parallel_for(0, N * H * W, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(C);
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t n = pix / (H * W), h = (pix / W) % H, wi = pix % W;
      dwconv_pixel_fp64(x, w, b, n, h, wi, H, W, C, k, acc.data());
      double mu = 0, sq = 0;
      for (const auto c : c10::irange(C)) mu += acc[c];
      mu /= C;
      for (const auto c : c10::irange(C)) sq += (acc[c] - mu) * (acc[c] - mu);
      const double rstd = 1 / std::sqrt(sq / C + eps);
      for (const auto c : c10::irange(C)) y[pix * C + c] = (acc[c] - mu) * rstd * lw[c] + lb[c];
      mean_out[pix] = static_cast<float>(mu);
      rstd_out[pix] = static_cast<float>(rstd);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_ln_cpu(
    const at::Tensor& x, const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps) {
  constexpr const char* op = "dwconv_ln";
  const int64_t k = check_dwconv_ln(x, conv_weight, conv_bias, ln_weight, ln_bias);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);

  at::Tensor y, mean, rstd;
  std::tie(y, mean, rstd) = dwconv_ln_outputs(x);
  if (x.numel() == 0) return {y, mean, rstd};

  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  if (x.scalar_type() == at::kDouble) {
    auto wc = conv_weight.contiguous();
    auto bc = conv_bias.has_value() ? conv_bias->contiguous() : at::Tensor();
    auto lwc = ln_weight.contiguous(), lbc = ln_bias.contiguous();
    dwconv_ln_cpu_fp64<double>(xc.data_ptr<double>(), wc.data_ptr<double>(),
                               bc.defined() ? bc.data_ptr<double>() : nullptr,
                               lwc.data_ptr<double>(), lbc.data_ptr<double>(), y.data_ptr<double>(),
                               mean.data_ptr<float>(), rstd.data_ptr<float>(), N, C, H, W, k, eps);
    return {y, mean, rstd};
  }
  const at::Tensor w_taps = cpu::conv_taps(conv_weight, false, cpu::conv_blocked(k));
  const at::Tensor b32 =
      conv_bias.has_value() ? converted_weight(*conv_bias, at::kFloat) : at::Tensor();
  const at::Tensor lw32 = converted_weight(ln_weight, at::kFloat);
  const at::Tensor lb32 = converted_weight(ln_bias, at::kFloat);
  auto launch = [&](auto* x_ptr, auto* y_ptr) {
    dwconv_ln_cpu_kernel(x_ptr, w_taps.data_ptr<float>(),
                         b32.defined() ? b32.data_ptr<float>() : nullptr, lw32.data_ptr<float>(),
                         lb32.data_ptr<float>(), y_ptr, mean.data_ptr<float>(),
                         rstd.data_ptr<float>(), N, C, H, W, k, eps);
  };
  switch (x.scalar_type()) {
    case at::kFloat:
      launch(xc.data_ptr<float>(), y.data_ptr<float>());
      break;
    case at::kBFloat16:
      launch(xc.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
      break;
    case at::kHalf:
      launch(xc.data_ptr<at::Half>(), y.data_ptr<at::Half>());
      break;
    default:
      TORCH_CHECK(false, op, ": x must be float32, bfloat16, float16 or float64, got ",
                  x.scalar_type());
  }
  return {y, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(convnext_fast, CPU, m) { m.impl("dwconv_ln", &dwconv_ln_cpu); }

}  // namespace convnext_fast

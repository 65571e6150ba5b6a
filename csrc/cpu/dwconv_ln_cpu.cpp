// dwconv_ln forward on the CPU: depthwise kxk conv ('same' padding, stride 1) + bias, then
// LayerNorm over C, for channels_last (NHWC) tensors.
//
// Work is split over output rows (n, h) with at::parallel_for. The k input rows an output row
// needs are widened to fp32 in a zero-padded ring of rows (cpu::RowWindow: one new row per output
// row; blocked by channel vector for k in {3, 5, 7}), so the tap loop has no bounds checks,
// streams through memory and reads fp32 whatever the input dtype. The conv
// (cpu::conv_row, register-blocked along W) writes one output row ([W, C] fp32) to a per-thread
// scratch buffer, normalised right away: the conv output never touches memory.
// Small images (few rows per thread) split the conv by channel planes instead
// (dwconv_ln_cpu_planes, split_by_planes below).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../include/cpu_vec.h"
#include "../include/derived_cache.h"
#include "../include/dwconv_ln.h"

namespace convnext_fast {
namespace {

using cpu::Vec;
using cpu::centered_sumsq;
using cpu::normalize;
using cpu::row_sum;
using cpu::widen;

// The per-pixel LayerNorm of conv outputs acc [M, C] (fp32) into y, and its statistics.
template <typename scalar_t>
inline void layer_norm_rows(float* acc, int64_t M, int64_t C, const float* ln_w, const float* ln_b,
                            scalar_t* y, float* mean_out, float* rstd_out, double eps) {
  for (const auto m : c10::irange(M)) {
    float* a = acc + m * C;
    const float muf = row_sum(a, C) / C;
    const float var = centered_sumsq(a, muf, C) / C;
    const float rstdf = 1.f / std::sqrt(var + static_cast<float>(eps));
    normalize(a, muf, rstdf, ln_w, ln_b, y + m * C, C);
    mean_out[m] = muf;
    rstd_out[m] = rstdf;
  }
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
      layer_norm_rows(acc_row.data(), W, C, ln_w, ln_b, y + nh * W * C, mean_out + nh * W,
                      rstd_out + nh * W, eps);
    }
  });
}

template <int K, typename scalar_t>
void conv_planes(const scalar_t* x, const float* w_taps, const float* conv_bias, float* conv,
                 int64_t N, int64_t C, int64_t H, int64_t W) {
  constexpr int64_t L = Vec::size(), p = K / 2;
  const int64_t Wp = W + 2 * p, Cv = (C + L - 1) / L;
  const cpu::ConvLayout lay{Wp * L, L, 0, L, K * K * L, true};
  at::parallel_for(0, N * Cv, 1, [&](int64_t u0, int64_t u1) {
    const cpu::ThreadScratch plane_mem(H * Wp * L);
    float* plane = plane_mem.data();
    for (const auto ih : c10::irange(H)) {  // the side padding; the interior is written per unit
      std::fill(plane + ih * Wp * L, plane + (ih * Wp + p) * L, 0.f);
      std::fill(plane + (ih * Wp + p + W) * L, plane + (ih + 1) * Wp * L, 0.f);
    }
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / Cv, c = (u % Cv) * L, lanes = std::min(L, C - c);
      const scalar_t* src = x + n * H * W * C + c;
      for (const auto ih : c10::irange(H)) {
        float* dst = plane + (ih * Wp + p) * L;
        for (const auto iw : c10::irange(W)) {
          widen(src + (ih * W + iw) * C, dst + iw * L, lanes);
          if (lanes < L) std::fill(dst + iw * L + lanes, dst + (iw + 1) * L, 0.f);
        }
      }
      const float* wt = w_taps + (u % Cv) * K * K * L;
      const float* b = conv_bias != nullptr ? conv_bias + c : nullptr;
      for (const auto h : c10::irange(H)) {
        // Rows outside the image contribute nothing: the plane holds only the H image rows.
        const int64_t kh_lo = std::max<int64_t>(0, p - h), kh_hi = std::min<int64_t>(K, H + p - h);
        cpu::conv_vec_row<K, true>(conv + ((n * H + h) * W) * C + c,
                                   plane + (h - p + kh_lo) * Wp * L, wt + kh_lo * K * L, b, lanes,
                                   C, W, lay, 0, kh_hi - kh_lo);
      }
    }
  });
}

// Small images (few rows per thread): the conv is split by channel vectors instead of rows, each
// vector's image plane widened once into a zero-padded buffer that stays in L1/L2, then the
// LayerNorm runs over the pixels. Split by rows, ConvNeXt-T's stage 4 at batch 1 (H = 7) gave
// each thread 3-4 output rows that needed 9-10 input rows, each written twice into a 14-slot
// ring of padded rows (560 KB per thread at C = 768, the cache lines written cold after each
// mlp). The sums are those of the rows split, in the same order (the same tiles), so both give
// the same bits.
template <typename scalar_t>
void dwconv_ln_cpu_planes(const scalar_t* x, const float* w_taps, const float* conv_bias,
                          const float* ln_w, const float* ln_b, scalar_t* y, float* mean_out,
                          float* rstd_out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t k,
                          double eps) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  // fp32 convolves into y and normalises it in place; other dtypes through an fp32 buffer
  const cpu::ThreadScratch conv_mem(kFloat ? 1 : N * H * W * C);
  float* conv;
  if constexpr (kFloat) {
    conv = y;
  } else {
    conv = conv_mem.data();
  }
  switch (k) {
    case 3: conv_planes<3>(x, w_taps, conv_bias, conv, N, C, H, W); break;
    case 5: conv_planes<5>(x, w_taps, conv_bias, conv, N, C, H, W); break;
    case 7: conv_planes<7>(x, w_taps, conv_bias, conv, N, C, H, W); break;
    default: TORCH_INTERNAL_ASSERT(false, "dwconv_ln planes: k = ", k, " is not 3, 5 or 7");
  }
  at::parallel_for(0, N * H * W, 16, [&](int64_t begin, int64_t end) {
    layer_norm_rows(conv + begin * C, end - begin, C, ln_w, ln_b, y + begin * C, mean_out + begin,
                    rstd_out + begin, eps);
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

// Whether the forward splits the conv by channel planes (dwconv_ln_cpu_planes) rather than rows:
// for ConvNeXt's kernel sizes, when the rows come to at most 16 per thread and every thread gets a
// plane. Measured on 2 Zen 4 threads, fp32, median ms rows vs planes, hot / after evicting the
// caches: batch 1, C = 192, H = 28 0.156 vs 0.116 / 0.304 vs 0.276; C = 384, H = 14 0.078 vs
// 0.071 / 0.245 vs 0.205; C = 768, H = 7 0.056 vs 0.041 / 0.228 vs 0.142. At 28 rows per thread
// it is a tie or a loss (batch 1, C = 96, H = 56: 0.352 vs 0.413 / 0.573 vs 0.655; batch 8,
// C = 768: 0.290 vs 0.288 / 0.546 vs 0.525). CONVNEXT_FAST_DWCONV_LN_CPU_SPLIT=rows|planes forces
// one (the tests run both).
bool split_by_planes(int64_t N, int64_t C, int64_t H, int64_t W, int64_t k) {
  if (!cpu::conv_blocked(k)) return false;
  const char* mode = std::getenv("CONVNEXT_FAST_DWCONV_LN_CPU_SPLIT");
  if (mode != nullptr && *mode != '\0' && std::strcmp(mode, "auto") != 0) {
    TORCH_CHECK(std::strcmp(mode, "rows") == 0 || std::strcmp(mode, "planes") == 0,
                "CONVNEXT_FAST_DWCONV_LN_CPU_SPLIT must be 'auto', 'rows' or 'planes', got '", mode,
                "'");
    return mode[0] == 'p';
  }
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  constexpr int64_t L = Vec::size();
  return threads > 1 && N * H <= 16 * threads && N * ((C + L - 1) / L) >= threads;
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
  const bool planes = split_by_planes(N, C, H, W, k);
  auto launch = [&](auto* x_ptr, auto* y_ptr) {
    using scalar_t = std::remove_pointer_t<decltype(y_ptr)>;
    const auto kernel = planes ? dwconv_ln_cpu_planes<scalar_t> : dwconv_ln_cpu_kernel<scalar_t>;
    kernel(x_ptr, w_taps.data_ptr<float>(), b32.defined() ? b32.data_ptr<float>() : nullptr,
           lw32.data_ptr<float>(), lb32.data_ptr<float>(), y_ptr, mean.data_ptr<float>(),
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

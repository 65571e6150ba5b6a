// dwconv_ln backward on the CPU, from the saved per-pixel fp32 mean/rstd; the conv output z is
// recomputed from x, never stored by the forward.
//
//   xhat = (z - mean) * rstd,  g = grad_y * ln_weight
//   dz   = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat))
//   d_ln_weight = sum_pix grad_y * xhat,  d_ln_bias = sum_pix grad_y,  d_conv_bias = sum_pix dz
//   d_conv_weight[c, kh, kw] = sum_pix dz[pix] * x[pix + (kh - p, kw - p)]
//   dx = dz correlated with the flipped kernel (a 'same' depthwise conv of dz)
//
// Pass 1 runs over image rows (n, h): it widens the k input rows around h to fp32 in a zero-padded
// window (as the forward does), recomputes z one pixel at a time, writes dz for the row to an fp32
// [N*H*W, C] buffer, and adds the row's contributions to the parameter gradients; the weight
// gradient of a row is a tap x pixel loop over the same window, so x is read once. Pass 2 turns dz
// into dx with the forward's conv loop and flipped taps.
//
// Determinism: rows are grouped into a fixed number of blocks that depends on the shape only, each
// block owns its partial sums (accumulated in a fixed order), and the partials are added block by
// block at the end. No result depends on the thread count or on which thread ran a block.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../include/cpu_vec.h"
#include "../include/derived_cache.h"
#include "../include/dwconv_ln.h"
#include "../include/dwconv_ln_bwd.h"

namespace convnext_fast {
namespace {

using cpu::Vec;

// Upper bound on the number of row blocks (each holds (k*k + 3) * C fp32 partial sums): enough
// blocks to balance any sensible thread count, few enough that the partials stay small.
constexpr int64_t kMaxBlocks = 64;

// Per-pixel LayerNorm backward on the recomputed conv output: xhat (in z, in place) and dz; adds
// grad_y * xhat, grad_y and dz into the block's partials.
inline void ln_backward_pixel(float* z, const float* gy, const float* lw, float mu, float rstd,
                              float* dz, float* part_dlw, float* part_dlb, float* part_dcb,
                              int64_t C) {
  const Vec vmu(mu), vr(rstd);
  Vec s1(0.f), s2(0.f);
  int64_t c = 0;
  for (; c + Vec::size() <= C; c += Vec::size()) {
    const Vec xh = (Vec::loadu(z + c) - vmu) * vr;
    xh.store(z + c);
    const Vec gyv = Vec::loadu(gy + c);
    const Vec g = gyv * Vec::loadu(lw + c);
    s1 = s1 + g;
    s2 = at::vec::fmadd(g, xh, s2);
    at::vec::fmadd(gyv, xh, Vec::loadu(part_dlw + c)).store(part_dlw + c);
    (Vec::loadu(part_dlb + c) + gyv).store(part_dlb + c);
  }
  float sum_g = at::vec::vec_reduce_all<float>(std::plus<Vec>(), s1);
  float sum_gx = at::vec::vec_reduce_all<float>(std::plus<Vec>(), s2);
  for (; c < C; ++c) {
    const float xh = (z[c] - mu) * rstd;
    z[c] = xh;
    const float g = gy[c] * lw[c];
    sum_g += g;
    sum_gx += g * xh;
    part_dlw[c] += gy[c] * xh;
    part_dlb[c] += gy[c];
  }
  const float m1 = sum_g / C, m2 = sum_gx / C;
  const Vec vm1(m1), vm2(m2);
  c = 0;
  for (; c + Vec::size() <= C; c += Vec::size()) {
    const Vec g = Vec::loadu(gy + c) * Vec::loadu(lw + c);
    const Vec d = vr * (g - vm1 - Vec::loadu(z + c) * vm2);
    d.store(dz + c);
    (Vec::loadu(part_dcb + c) + d).store(part_dcb + c);
  }
  for (; c < C; ++c) {
    const float d = rstd * (gy[c] * lw[c] - m1 - z[c] * m2);
    dz[c] = d;
    part_dcb[c] += d;
  }
}

// Channels [c0, C) of the sums below, one at a time (C not a multiple of the vector width).
inline void weight_grad_scalar(float* part_dw, const float* dz, const float* rows,
                               int64_t row_stride, int64_t c0, int64_t C, int64_t W, int64_t k,
                               int64_t kh_lo, int64_t kh_hi) {
  for (int64_t c = c0; c < C; ++c) {
    for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
      for (int64_t kw = 0; kw < k; ++kw) {
        float a = part_dw[(kh * k + kw) * C + c];
        for (int64_t w = 0; w < W; ++w) a += dz[w * C + c] * rows[kh * row_stride + (w + kw) * C + c];
        part_dw[(kh * k + kw) * C + c] = a;
      }
    }
  }
}

// part_dw[tap, c] += sum over the W pixels of the row of dz[w, c] * window[kh, w + kw, c], for
// rows kh in [kh_lo, kh_hi) (the others are padding: zero). NV vectors of one tap in registers.
template <int NV>
inline int64_t weight_grad_block(float* part_dw, const float* dz, const float* rows,
                                 int64_t row_stride, int64_t c0, int64_t C, int64_t W, int64_t k,
                                 int64_t kh_lo, int64_t kh_hi) {
  constexpr int64_t kStep = NV * Vec::size();
  for (; c0 + kStep <= C; c0 += kStep) {
    for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
      for (int64_t kw = 0; kw < k; ++kw) {
        float* dst = part_dw + (kh * k + kw) * C + c0;
        const float* src = rows + kh * row_stride + kw * C + c0;
        Vec a[NV];
        for (int i = 0; i < NV; ++i) a[i] = Vec::loadu(dst + i * Vec::size());
        for (int64_t w = 0; w < W; ++w) {
          for (int i = 0; i < NV; ++i) {
            a[i] = at::vec::fmadd(Vec::loadu(dz + w * C + c0 + i * Vec::size()),
                                  Vec::loadu(src + w * C + i * Vec::size()), a[i]);
          }
        }
        for (int i = 0; i < NV; ++i) a[i].store(dst + i * Vec::size());
      }
    }
  }
  return c0;
}

// The same sums for kernel size K and NV vectors of channels from c: the K * NV tap sums of a
// kernel row stay in registers over the row's pixels (14 sums + 2 dz vectors at K = 7, NV = 2:
// the 16 AVX2 registers), one dz load per vector and pixel instead of one per tap, and 16 channels
// = one cache line per pixel, so a row's window stays in L1 (8 channels used half of each line,
// and at C = 96, W = 56 the window and dz rows overflowed L1). Each tap adds its pixels in order
// w = 0, 1, ...: the sums are bitwise those of weight_grad_block.
template <int K, int NV>
inline int64_t weight_grad_block_k(float* part_dw, const float* dz, const float* rows,
                                   int64_t row_stride, int64_t c, int64_t C, int64_t W,
                                   int64_t kh_lo, int64_t kh_hi) {
  constexpr int64_t V = Vec::size();
  for (; c + NV * V <= C; c += NV * V) {
    for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
      float* dst = part_dw + kh * K * C + c;
      const float* src = rows + kh * row_stride + c;
      Vec a[K][NV];
#pragma GCC unroll 16
      for (int kw = 0; kw < K; ++kw) {
#pragma GCC unroll 4
        for (int i = 0; i < NV; ++i) a[kw][i] = Vec::loadu(dst + kw * C + i * V);
      }
      for (int64_t w = 0; w < W; ++w) {
        Vec d[NV];
#pragma GCC unroll 4
        for (int i = 0; i < NV; ++i) d[i] = Vec::loadu(dz + w * C + c + i * V);
#pragma GCC unroll 16
        for (int kw = 0; kw < K; ++kw) {
#pragma GCC unroll 4
          for (int i = 0; i < NV; ++i) {
            a[kw][i] = at::vec::fmadd(d[i], Vec::loadu(src + (w + kw) * C + i * V), a[kw][i]);
          }
        }
      }
#pragma GCC unroll 16
      for (int kw = 0; kw < K; ++kw) {
#pragma GCC unroll 4
        for (int i = 0; i < NV; ++i) a[kw][i].store(dst + kw * C + i * V);
      }
    }
  }
  return c;
}

template <int K>
inline void weight_grad_row_k(float* part_dw, const float* dz, const float* rows,
                              int64_t row_stride, int64_t C, int64_t W, int64_t kh_lo,
                              int64_t kh_hi) {
  int64_t c = weight_grad_block_k<K, 2>(part_dw, dz, rows, row_stride, 0, C, W, kh_lo, kh_hi);
  c = weight_grad_block_k<K, 1>(part_dw, dz, rows, row_stride, c, C, W, kh_lo, kh_hi);
  weight_grad_scalar(part_dw, dz, rows, row_stride, c, C, W, K, kh_lo, kh_hi);
}

inline void weight_grad_row(float* part_dw, const float* dz, const float* rows, int64_t row_stride,
                            int64_t C, int64_t W, int64_t k, int64_t kh_lo, int64_t kh_hi) {
  switch (k) {
    case 3:
      return weight_grad_row_k<3>(part_dw, dz, rows, row_stride, C, W, kh_lo, kh_hi);
    case 5:
      return weight_grad_row_k<5>(part_dw, dz, rows, row_stride, C, W, kh_lo, kh_hi);
    case 7:
      return weight_grad_row_k<7>(part_dw, dz, rows, row_stride, C, W, kh_lo, kh_hi);
    default:
      break;
  }
  int64_t c = weight_grad_block<4>(part_dw, dz, rows, row_stride, 0, C, W, k, kh_lo, kh_hi);
  c = weight_grad_block<1>(part_dw, dz, rows, row_stride, c, C, W, k, kh_lo, kh_hi);
  weight_grad_scalar(part_dw, dz, rows, row_stride, c, C, W, k, kh_lo, kh_hi);
}

template <typename scalar_t>
void dwconv_ln_bwd_cpu_kernel(const scalar_t* grad_y, const scalar_t* x, const float* w_taps,
                              const float* w_taps_flipped, const float* conv_bias,
                              const float* ln_w, const float* mean, const float* rstd,
                              scalar_t* dx, float* dw_taps, float* db, float* dlw, float* dlb,
                              int64_t N, int64_t C, int64_t H, int64_t W, int64_t k) {
  const int64_t p = k / 2, KK = k * k;
  const int64_t rows_total = N * H;
  const int64_t rows_per_block = (rows_total + kMaxBlocks - 1) / kMaxBlocks;
  const int64_t n_blocks = (rows_total + rows_per_block - 1) / rows_per_block;
  const int64_t part_size = (KK + 3) * C;
  std::vector<float> partials(n_blocks * part_size, 0.f);
  // Uninitialised: pass 1 writes every element before pass 2 reads it.
  const at::Tensor dz_buf = at::empty({N * H * W * C}, at::TensorOptions().dtype(at::kFloat));
  float* dz = dz_buf.data_ptr<float>();

  at::parallel_for(0, n_blocks, 1, [&](int64_t b_begin, int64_t b_end) {
    cpu::RowWindow window(k, W, C);
    const cpu::ThreadScratch gy_row(W * C);
    for (int64_t blk = b_begin; blk < b_end; ++blk) {
      float* part_dw = partials.data() + blk * part_size;
      float* part_dcb = part_dw + KK * C;
      float* part_dlw = part_dcb + C;
      float* part_dlb = part_dlw + C;
      const int64_t r_end = std::min(rows_total, (blk + 1) * rows_per_block);
      for (int64_t nh = blk * rows_per_block; nh < r_end; ++nh) {
        const int64_t n = nh / H, h = nh % H;
        const float* rows = window.rows(x, n, h, H);
        cpu::widen(grad_y + nh * W * C, gy_row.data(), W * C);
        const int64_t kh_lo = std::max<int64_t>(0, p - h);
        const int64_t kh_hi = std::min<int64_t>(k, H + p - h);
        float* dz_row = dz + nh * W * C;
        // z goes to the dz row first and is overwritten by dz pixel by pixel: no scratch.
        cpu::conv_row(dz_row, rows, window.layout(), w_taps, conv_bias, C, W, k, kh_lo, kh_hi);
        for (const auto w : c10::irange(W)) {
          float* zp = dz_row + w * C;
          ln_backward_pixel(zp, gy_row.data() + w * C, ln_w, mean[nh * W + w], rstd[nh * W + w], zp,
                            part_dlw, part_dlb, part_dcb, C);
        }
        weight_grad_row(part_dw, dz_row, rows, window.row_stride(), C, W, k, kh_lo, kh_hi);
      }
    }
  });

  // Fixed-order reduction of the block partials.
  std::fill(dw_taps, dw_taps + KK * C, 0.f);
  std::fill(db, db + C, 0.f);
  std::fill(dlw, dlw + C, 0.f);
  std::fill(dlb, dlb + C, 0.f);
  for (const auto blk : c10::irange(n_blocks)) {
    const float* part = partials.data() + blk * part_size;
    cpu::add_into(dw_taps, part, KK * C);
    cpu::add_into(db, part + KK * C, C);
    cpu::add_into(dlw, part + (KK + 1) * C, C);
    cpu::add_into(dlb, part + (KK + 2) * C, C);
  }

  // dx: the forward's conv loop over the dz window, taps flipped, no bias.
  at::parallel_for(0, rows_total, 1, [&](int64_t begin, int64_t end) {
    cpu::RowWindow window(k, W, C, cpu::conv_blocked(k));
    const cpu::ThreadScratch acc(W * C);
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t n = nh / H, h = nh % H;
      const float* rows = window.rows(static_cast<const float*>(dz), n, h, H);
      const int64_t kh_lo = std::max<int64_t>(0, p - h);
      const int64_t kh_hi = std::min<int64_t>(k, H + p - h);
      cpu::conv_row(acc.data(), rows, window.layout(), w_taps_flipped, nullptr, C, W, k, kh_lo,
                    kh_hi);
      cpu::narrow(acc.data(), dx + nh * W * C, W * C);
    }
  });
}

// fp64 end to end (for gradcheck): plain loops. Parameter gradients are reduced per channel, each
// channel's pixels in order, so they are deterministic too.
void dwconv_ln_bwd_cpu_fp64(const double* grad_y, const double* x, const double* w,
                            const double* b, const double* lw, const float* mean,
                            const float* rstd, double* dx, double* dw, double* db, double* dlw,
                            double* dlb, int64_t N, int64_t C, int64_t H, int64_t W, int64_t k) {
  const int64_t p = k / 2, P = N * H * W;
  std::vector<double> xhat(P * C), dz(P * C);
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> g(C);
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t n = pix / (H * W), h = (pix / W) % H, wi = pix % W;
      double* xh = xhat.data() + pix * C;
      dwconv_pixel_fp64(x, w, b, n, h, wi, H, W, C, k, xh);
      double s1 = 0, s2 = 0;
      const double mu = mean[pix], r = rstd[pix];
      for (const auto c : c10::irange(C)) {
        xh[c] = (xh[c] - mu) * r;
        g[c] = grad_y[pix * C + c] * lw[c];
        s1 += g[c];
        s2 += g[c] * xh[c];
      }
      for (const auto c : c10::irange(C)) {
        dz[pix * C + c] = r * (g[c] - s1 / C - xh[c] * s2 / C);
      }
    }
  });
  at::parallel_for(0, C, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      double s_lw = 0, s_lb = 0, s_b = 0;
      for (const auto pix : c10::irange(P)) {
        s_lw += grad_y[pix * C + c] * xhat[pix * C + c];
        s_lb += grad_y[pix * C + c];
        s_b += dz[pix * C + c];
      }
      dlw[c] = s_lw;
      dlb[c] = s_lb;
      db[c] = s_b;
      for (const auto kh : c10::irange(k)) {
        for (const auto kw : c10::irange(k)) {
          double s = 0;
          for (const auto pix : c10::irange(P)) {
            const int64_t n = pix / (H * W), h = (pix / W) % H, wi = pix % W;
            const int64_t ih = h + kh - p, iw = wi + kw - p;
            if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
            s += dz[pix * C + c] * x[((n * H + ih) * W + iw) * C + c];
          }
          dw[(c * k + kh) * k + kw] = s;
        }
      }
    }
  });
  at::parallel_for(0, P, 16, [&](int64_t begin, int64_t end) {
    for (int64_t pix = begin; pix < end; ++pix) {
      const int64_t n = pix / (H * W), h = (pix / W) % H, wi = pix % W;
      double* out = dx + pix * C;
      for (const auto c : c10::irange(C)) out[c] = 0;
      for (const auto kh : c10::irange(k)) {
        const int64_t oh = h - kh + p;  // the output pixel that read x[h, wi] through tap kh
        if (oh < 0 || oh >= H) continue;
        for (const auto kw : c10::irange(k)) {
          const int64_t ow = wi - kw + p;
          if (ow < 0 || ow >= W) continue;
          const double* d = dz.data() + ((n * H + oh) * W + ow) * C;
          for (const auto c : c10::irange(C)) out[c] += d[c] * w[(c * k + kh) * k + kw];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_ln_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, const at::Tensor& ln_weight,
    const at::Tensor& mean, const at::Tensor& rstd) {
  constexpr const char* op = "dwconv_ln_bwd";
  at::AutoDispatchBelowADInplaceOrView guard;  // inputs may require grad (double backward off)
  const int64_t k = check_dwconv_ln_bwd(grad_y, x, conv_weight, conv_bias, ln_weight, mean, rstd);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor dx, dw, db, dlw, dlb;
  std::tie(dx, dw, db, dlw, dlb) = dwconv_ln_bwd_outputs(x, conv_weight, conv_bias, ln_weight);
  if (x.numel() == 0) {
    for (at::Tensor* t : {&dw, &db, &dlw, &dlb}) t->zero_();
    return {dx, dw, db, dlw, dlb};
  }
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();

  if (x.scalar_type() == at::kDouble) {
    const at::Tensor wc = conv_weight.contiguous(), lwc = ln_weight.contiguous();
    const at::Tensor bc = conv_bias.has_value() ? conv_bias->contiguous() : at::Tensor();
    dwconv_ln_bwd_cpu_fp64(grad_y.data_ptr<double>(), x.data_ptr<double>(), wc.data_ptr<double>(),
                           bc.defined() ? bc.data_ptr<double>() : nullptr, lwc.data_ptr<double>(),
                           mc.data_ptr<float>(), rc.data_ptr<float>(), dx.data_ptr<double>(),
                           dw.data_ptr<double>(), db.data_ptr<double>(), dlw.data_ptr<double>(),
                           dlb.data_ptr<double>(), N, C, H, W, k);
    return {dx, dw, db, dlw, dlb};
  }

  // The taps, and the same flipped for dx. The z recompute shares its window with the weight
  // gradient (channels-last); dx has its own window over dz, blocked.
  const at::Tensor w_taps = cpu::conv_taps(conv_weight);
  const at::Tensor w_flip = cpu::conv_taps(conv_weight, true, cpu::conv_blocked(k));
  const at::Tensor b32 =
      conv_bias.has_value() ? converted_weight(*conv_bias, at::kFloat) : at::Tensor();
  const at::Tensor lw32 = converted_weight(ln_weight, at::kFloat);
  auto opts = x.options().dtype(at::kFloat);
  at::Tensor dw_taps = at::empty({k * k, C}, opts);
  at::Tensor db32 = at::empty({C}, opts), dlw32 = at::empty({C}, opts), dlb32 = at::empty({C}, opts);
  auto launch = [&](auto* gy_ptr, auto* x_ptr, auto* dx_ptr) {
    dwconv_ln_bwd_cpu_kernel(gy_ptr, x_ptr, w_taps.data_ptr<float>(), w_flip.data_ptr<float>(),
                             b32.defined() ? b32.data_ptr<float>() : nullptr,
                             lw32.data_ptr<float>(), mc.data_ptr<float>(), rc.data_ptr<float>(),
                             dx_ptr, dw_taps.data_ptr<float>(), db32.data_ptr<float>(),
                             dlw32.data_ptr<float>(), dlb32.data_ptr<float>(), N, C, H, W, k);
  };
  switch (x.scalar_type()) {
    case at::kFloat:
      launch(grad_y.data_ptr<float>(), x.data_ptr<float>(), dx.data_ptr<float>());
      break;
    case at::kBFloat16:
      launch(grad_y.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(),
             dx.data_ptr<at::BFloat16>());
      break;
    case at::kHalf:
      launch(grad_y.data_ptr<at::Half>(), x.data_ptr<at::Half>(), dx.data_ptr<at::Half>());
      break;
    default:
      TORCH_CHECK(false, op, ": x must be float32, bfloat16, float16 or float64, got ",
                  x.scalar_type());
  }
  dw.copy_(dw_taps.t().reshape({C, 1, k, k}));
  db.copy_(db32);
  dlw.copy_(dlw32);
  dlb.copy_(dlb32);
  return {dx, dw, db, dlw, dlb};
}

}  // namespace

TORCH_LIBRARY_IMPL(convnext_fast, CPU, m) { m.impl("dwconv_ln_bwd", &dwconv_ln_bwd_cpu); }

}  // namespace convnext_fast

// Vectorized helpers shared by the CPU kernels (csrc/cpu/*.cpp): fp32 compute along C with
// at::vec, whatever the storage dtype.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace convnext_fast {
namespace cpu {

using Vec = at::vec::Vectorized<float>;

// Reduced-precision rows are widened to fp32 once (at::vec::convert is vectorized for them).
template <typename scalar_t>
inline void widen(const scalar_t* src, float* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

template <typename scalar_t>
inline void narrow(const float* src, scalar_t* dst, int64_t n) {
  at::vec::convert(src, dst, n);
}

// dst[0:n] += src[0:n]
inline void add_into(float* dst, const float* src, int64_t n) {
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    (Vec::loadu(dst + c) + Vec::loadu(src + c)).store(dst + c);
  }
  for (; c < n; ++c) dst[c] += src[c];
}

// A depthwise conv weight [C, 1, k, k] (any float dtype) as taps [k * k, C] fp32: one contiguous
// row of C weights per tap, what the conv loops read. flip reverses the taps (the kernel rotated
// by 180 degrees, for the input gradient). A blocked loop over 16 channels: ATen's strided
// transposing copy took 27 us at C = 768, k = 7, a fifth of the whole op at batch 1.
inline at::Tensor conv_taps(const at::Tensor& conv_weight, bool flip = false) {
  const at::Tensor w = conv_weight.contiguous();
  const int64_t C = w.size(0), kk = w.size(2) * w.size(3);
  at::Tensor taps = at::empty({kk, C}, w.options().dtype(at::kFloat));
  float* dst = taps.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "conv_taps", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    constexpr int64_t kBlock = 16;
    for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
      const int64_t cn = std::min(kBlock, C - c0);
      for (int64_t t = 0; t < kk; ++t) {
        const scalar_t* col = src + c0 * kk + (flip ? kk - 1 - t : t);
        float* row = dst + t * C + c0;
        for (int64_t i = 0; i < cn; ++i) row[i] = static_cast<float>(col[i * kk]);
      }
    }
  });
  return taps;
}

// erf for the GELU epilogues. fp32: a [13/8]-degree odd rational of x, erf(x) = x P(x^2) / Q(x^2)
// (the coefficients of Eigen's and XLA's fp32 erf, lowest degree first; |x| clamped to 4, beyond
// which fp32 erf is +-1 to within 2e-8), max abs error 4.2e-7 against fp64 (at |x| = 3.6;
// tests/ops/test_mlp.py checks the GELU over [-10, 10]). It costs a third of at::vec's erf
// (Abramowitz-Stegun 7.1.26 around a Sleef exp, error 1.5e-7; 0.52 vs 1.55 ns per element in the
// GELU loop on AVX2), whose GELU was ~20% of the GEMM time of a ConvNeXt stage-1 mlp tile.
// fp64 keeps at::vec's erf.
constexpr double kErfP[7] = {-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04,
                             -5.69250639462346e-05, -2.10102402082508e-06, 2.77068142495902e-08,
                             -2.72614225801306e-10};
constexpr double kErfQ[5] = {-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03,
                             -2.13374055278905e-04, -1.45660718464996e-05};

// sum_i c[i] * scale * ratio^i * s^i by Horner's rule, each coefficient rounded to fp32 once
// (the scaling is folded at compile time).
template <int N>
inline at::vec::Vectorized<float> horner(const double (&c)[N], at::vec::Vectorized<float> s,
                                         double scale = 1.0, double ratio = 1.0) {
  using V = at::vec::Vectorized<float>;
  double f = scale;
  for (int i = 0; i < N - 1; ++i) f *= ratio;
  V p(static_cast<float>(c[N - 1] * f));
  for (int i = N - 2; i >= 0; --i) {
    f /= ratio;
    p = at::vec::fmadd(p, s, V(static_cast<float>(c[i] * f)));
  }
  return p;
}

inline at::vec::Vectorized<float> erf_fast(at::vec::Vectorized<float> x) {
  using V = at::vec::Vectorized<float>;
  x = at::vec::minimum(at::vec::maximum(x, V(-4.f)), V(4.f));
  const V x2 = x * x;
  return x * horner(kErfP, x2) / horner(kErfQ, x2);
}

inline at::vec::Vectorized<double> erf_fast(at::vec::Vectorized<double> x) { return x.erf(); }

// Phi(x) = P(X <= x), X ~ N(0, 1): gelu_erf(x) = x * Phi(x).
template <typename acc_t>
inline at::vec::Vectorized<acc_t> normal_cdf(at::vec::Vectorized<acc_t> x) {
  using V = at::vec::Vectorized<acc_t>;
  return V(acc_t(0.5)) * (V(acc_t(1)) + erf_fast(x * V(acc_t(M_SQRT1_2))));
}

// gelu_erf(x) = x * Phi(x). fp32 folds the 1/sqrt(2) and the 1/2 into the rational's
// coefficients: with u = x clamped to +-4 sqrt(2), gelu(x) = x / 2 + x u P(u^2 / 2) / (2 sqrt(2)
// Q(u^2 / 2)), 17 vector operations instead of 19 (0.37 vs 0.47 ns per element in the GELU loop
// on AVX2; max abs error 1.0e-6 against fp64 over [-10, 10], the same tolerance as before).
inline at::vec::Vectorized<float> gelu_erf(at::vec::Vectorized<float> x) {
  using V = at::vec::Vectorized<float>;
  constexpr float kLimit = static_cast<float>(4.0 * M_SQRT2);
  const V u = at::vec::minimum(at::vec::maximum(x, V(-kLimit)), V(kLimit));
  const V s = u * u;
  const V r = x * u * horner(kErfP, s, 0.5 * M_SQRT1_2, 0.5) / horner(kErfQ, s, 1.0, 0.5);
  return at::vec::fmadd(x, V(0.5f), r);
}

inline at::vec::Vectorized<double> gelu_erf(at::vec::Vectorized<double> x) {
  return x * normal_cdf(x);
}

// Depthwise kxk conv of one output pixel over a zero-padded fp32 row window:
// acc[c] = bias[c] + sum over taps (kh in [kh_lo, kh_hi), kw) of rows[kh * row_stride + kw * C + c]
// * w_taps[(kh * k + kw) * C + c], for c from c0 in blocks of NV vectors held in registers across
// all taps (one load/store of acc per block, not per tap). Returns the first channel not done.
// Channels [c0, c_end) are done, in whole blocks; C is the pixel stride (the channel count).
template <int NV>
inline int64_t conv_block(float* acc, const float* rows, int64_t row_stride, const float* w_taps,
                          const float* bias, int64_t c0, int64_t c_end, int64_t C, int64_t k,
                          int64_t kh_lo, int64_t kh_hi) {
  constexpr int64_t kStep = NV * Vec::size();
  for (; c0 + kStep <= c_end; c0 += kStep) {
    Vec a[NV];
    for (int i = 0; i < NV; ++i) {
      a[i] = bias != nullptr ? Vec::loadu(bias + c0 + i * Vec::size()) : Vec(0.f);
    }
    for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
      const float* row = rows + kh * row_stride + c0;
      const float* wt = w_taps + kh * k * C + c0;
      for (int64_t kw = 0; kw < k; ++kw) {
        for (int i = 0; i < NV; ++i) {
          a[i] = at::vec::fmadd(Vec::loadu(row + kw * C + i * Vec::size()),
                                Vec::loadu(wt + kw * C + i * Vec::size()), a[i]);
        }
      }
    }
    for (int i = 0; i < NV; ++i) a[i].store(acc + c0 + i * Vec::size());
  }
  return c0;
}

// Channels [c0, C) of one pixel: vector blocks of 4 and 1, then a scalar tail for C not a
// multiple of the width.
inline void conv_pixel_from(float* acc, const float* rows, int64_t row_stride,
                            const float* w_taps, const float* bias, int64_t c0, int64_t C,
                            int64_t k, int64_t kh_lo, int64_t kh_hi) {
  int64_t c = conv_block<4>(acc, rows, row_stride, w_taps, bias, c0, C, C, k, kh_lo, kh_hi);
  c = conv_block<1>(acc, rows, row_stride, w_taps, bias, c, C, C, k, kh_lo, kh_hi);
  for (; c < C; ++c) {
    float a = bias != nullptr ? bias[c] : 0.f;
    for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
      for (int64_t kw = 0; kw < k; ++kw) {
        a += rows[kh * row_stride + kw * C + c] * w_taps[(kh * k + kw) * C + c];
      }
    }
    acc[c] = a;
  }
}

// The k zero-padded fp32 input rows around an output row (h - p .. h + p of image n, each
// W + 2p pixels of C channels), kept as a ring so that stepping to the next output row widens
// one new input row instead of k. Each input row is stored twice, in slots s and s + k, so the k
// rows of any window are contiguous: rows(...)[kh * row_stride()] is input row h - p + kh.
// Rows outside the image are never written: the conv loops skip them (kh_lo/kh_hi).
class RowWindow {
 public:
  // Only the padding columns are zeroed: a row's interior is always widened before it is read.
  RowWindow(int64_t k, int64_t W, int64_t C)
      : k_(k), p_(k / 2), W_(W), C_(C), stride_((W + 2 * (k / 2)) * C),
        buf_(new float[2 * k * stride_]) {
    for (int64_t s = 0; s < 2 * k_; ++s) {
      float* slot = buf_.get() + s * stride_;
      std::fill(slot, slot + p_ * C_, 0.f);
      std::fill(slot + (p_ + W_) * C_, slot + stride_, 0.f);
    }
  }

  int64_t row_stride() const { return stride_; }

  // Rows of image n around output row h, from src (NHWC, H rows of W * C). Any order of calls
  // is correct; stepping h up by one within an image widens one row.
  template <typename scalar_t>
  const float* rows(const scalar_t* src, int64_t n, int64_t h, int64_t H) {
    const int64_t lo = h - p_, hi = std::min(h + p_ + 1, H);
    int64_t ih = std::max<int64_t>(lo, 0);
    if (n == n_ && ih >= loaded_end_ - k_) {
      ih = std::max(ih, loaded_end_);  // rows [loaded_end_ - k, loaded_end_) are in the ring
    } else {
      loaded_end_ = ih;
    }
    n_ = n;
    for (; ih < hi; ++ih) {
      float* slot = buf_.get() + (ih % k_) * stride_ + p_ * C_;
      widen(src + (n * H + ih) * W_ * C_, slot, W_ * C_);
      std::copy(slot, slot + W_ * C_, slot + k_ * stride_);
    }
    loaded_end_ = std::max(loaded_end_, hi);
    return buf_.get() + (((lo % k_) + k_) % k_) * stride_;
  }

 private:
  int64_t k_, p_, W_, C_, stride_;
  std::unique_ptr<float[]> buf_;
  int64_t n_ = -1, loaded_end_ = 0;  // input rows [.., loaded_end_) of image n_ are in the ring
};

// One kernel row of a tile: a[r] += sum over kw of row[(r + kw) * C] * wt[kw * C], r < R. The K
// taps stay in registers and every input vector loaded serves up to K outputs: R + K - 1 loads
// per R * K FMAs (conv_block loads twice per FMA).
template <int K, int R>
inline void conv_tile_row(Vec (&a)[R], const float* row, const float* wt, int64_t C) {
  Vec wv[K];
#pragma GCC unroll 16
  for (int kw = 0; kw < K; ++kw) wv[kw] = Vec::loadu(wt + kw * C);
#pragma GCC unroll 32
  for (int j = 0; j < R + K - 1; ++j) {
    const Vec xv = Vec::loadu(row + j * C);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int kw = j - r;
      if (kw >= 0 && kw < K) a[r] = at::vec::fmadd(xv, wv[kw], a[r]);
    }
  }
}

// Accumulator sets of an R-pixel tile (see conv_tile): enough independent FMA chains for narrow
// tiles while S * R sums + K taps + 1 input still fit the 16 AVX2 registers.
constexpr int tile_sets(int R) { return R >= 5 ? 1 : (R >= 3 ? 2 : 4); }

// R consecutive output pixels [w0, w0 + R) x one vector of channels at c, kernel size K. The sums
// are independent FMA chains, and with FMA latency 4-5 and two FMA pipes ~10 are needed to keep
// the pipes busy: R = 8 (8 sums + 7 taps + 1 input = the 16 AVX2 registers at K = 7) measured
// 1.2x faster than R = 4 and 1.7x faster than conv_block at ConvNeXt-T's stage-1 shape
// (benchmarks/results/cpu2core_ops.txt). Narrow tiles (R < 5) add chains by giving successive
// kernel rows separate sets of sums (kernel row kh into set (kh - kh_lo) % S), added at the end.
template <int K, int R>
inline void conv_tile(float* acc, const float* rows, int64_t row_stride, const float* w_taps,
                      const float* bias, int64_t c, int64_t C, int64_t w0, int64_t kh_lo,
                      int64_t kh_hi) {
  constexpr int S = tile_sets(R);
  Vec a[S][R];
  const Vec b = bias != nullptr ? Vec::loadu(bias + c) : Vec(0.f);
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[s][r] = s == 0 ? b : Vec(0.f);
  }
  const float* row = rows + w0 * C + c;
  const float* wt = w_taps + c;
  int64_t kh = kh_lo;
  for (; kh + S <= kh_hi; kh += S) {
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      conv_tile_row<K, R>(a[s], row + (kh + s) * row_stride, wt + (kh + s) * K * C, C);
    }
  }
#pragma GCC unroll 8
  for (int s = 0; s + 1 < S; ++s) {
    if (kh + s < kh_hi) {
      conv_tile_row<K, R>(a[s], row + (kh + s) * row_stride, wt + (kh + s) * K * C, C);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    Vec sum = a[0][r];
#pragma GCC unroll 8
    for (int s = 1; s < S; ++s) sum = sum + a[s][r];
    sum.store(acc + (w0 + r) * C + c);
  }
}

template <int K>
inline void conv_tile_any(int64_t R, float* acc, const float* rows, int64_t row_stride,
                          const float* w_taps, const float* bias, int64_t c, int64_t C, int64_t w0,
                          int64_t kh_lo, int64_t kh_hi) {
  switch (R) {
#define CONVNEXT_FAST_CONV_TILE(r)                                                           \
  case r:                                                                                    \
    return conv_tile<K, r>(acc, rows, row_stride, w_taps, bias, c, C, w0, kh_lo, kh_hi);
    CONVNEXT_FAST_CONV_TILE(1)
    CONVNEXT_FAST_CONV_TILE(2)
    CONVNEXT_FAST_CONV_TILE(3)
    CONVNEXT_FAST_CONV_TILE(4)
    CONVNEXT_FAST_CONV_TILE(5)
    CONVNEXT_FAST_CONV_TILE(6)
    CONVNEXT_FAST_CONV_TILE(7)
    CONVNEXT_FAST_CONV_TILE(8)
#undef CONVNEXT_FAST_CONV_TILE
    default:
      TORCH_INTERNAL_ASSERT(false, "conv_tile_any: tile width ", R, " not in [1, 8]");
  }
}

// A row of W outputs is cut into ceil(W / 8) tiles of near-equal width (W = 14: 7 + 7, not
// 8 + 4 + 2; W = 7: one tile of 7, not 4 + 3). A narrow tile costs more per pixel (more loads per
// FMA, fewer independent chains): at C = 384, W = 14 the 8-, 4- and 2-pixel tiles took 3.6%, 5.3%
// and 7.7% of the op per pixel (benchmarks/results/cpu2core_ops.txt). Every tile is at least 4
// wide once W >= 4.
template <int K>
inline void conv_row_k(float* acc, const float* rows, int64_t row_stride, const float* w_taps,
                       const float* bias, int64_t C, int64_t W, int64_t kh_lo, int64_t kh_hi) {
  constexpr int64_t kMaxR = 8;
  const int64_t tiles = (W + kMaxR - 1) / kMaxR;
  const int64_t narrow_w = W / tiles, wide = W % tiles;  // `wide` tiles are one pixel wider
  int64_t c = 0;
  for (; c + Vec::size() <= C; c += Vec::size()) {
    int64_t w = 0;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t R = narrow_w + (t < wide ? 1 : 0);
      conv_tile_any<K>(R, acc, rows, row_stride, w_taps, bias, c, C, w, kh_lo, kh_hi);
      w += R;
    }
  }
  if (c < C) {
    for (int64_t w = 0; w < W; ++w) {
      conv_pixel_from(acc + w * C, rows + w * C, row_stride, w_taps, bias, c, C, K, kh_lo, kh_hi);
    }
  }
}

// The conv of a whole output row: acc[w * C + c] for w in [0, W), from the zero-padded window
// (k rows of W + k - 1 pixels; row stride row_stride, pixel stride C). ConvNeXt's kernel sizes
// take the register-blocked path; channel vectors are the outer loop, so the window and taps of
// one vector stay in L1 across the row. Other odd k: blocks of 4 vectors per pixel.
inline void conv_row(float* acc, const float* rows, int64_t row_stride, const float* w_taps,
                     const float* bias, int64_t C, int64_t W, int64_t k, int64_t kh_lo,
                     int64_t kh_hi) {
  switch (k) {
    case 3:
      return conv_row_k<3>(acc, rows, row_stride, w_taps, bias, C, W, kh_lo, kh_hi);
    case 5:
      return conv_row_k<5>(acc, rows, row_stride, w_taps, bias, C, W, kh_lo, kh_hi);
    case 7:
      return conv_row_k<7>(acc, rows, row_stride, w_taps, bias, C, W, kh_lo, kh_hi);
    default:
      break;
  }
  constexpr int64_t kBlock = 4 * Vec::size();
  int64_t c0 = 0;
  for (; c0 + kBlock <= C; c0 += kBlock) {
    for (int64_t w = 0; w < W; ++w) {
      conv_block<4>(acc + w * C, rows + w * C, row_stride, w_taps, bias, c0, c0 + kBlock, C, k, kh_lo,
                    kh_hi);
    }
  }
  if (c0 < C) {
    for (int64_t w = 0; w < W; ++w) {
      conv_pixel_from(acc + w * C, rows + w * C, row_stride, w_taps, bias, c0, C, k, kh_lo, kh_hi);
    }
  }
}

}  // namespace cpu
}  // namespace convnext_fast

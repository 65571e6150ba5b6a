// Vectorized helpers shared by the CPU kernels (csrc/cpu/*.cpp): fp32 compute along C with
// at::vec, whatever the storage dtype.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <functional>

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

inline float vec_sum(const float* a, int64_t n) {
  Vec s(0.f);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) s = s + Vec::loadu(a + c);
  float total = at::vec::vec_reduce_all<float>(std::plus<Vec>(), s);
  for (; c < n; ++c) total += a[c];
  return total;
}

// dst[0:n] += src[0:n]
inline void add_into(float* dst, const float* src, int64_t n) {
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    (Vec::loadu(dst + c) + Vec::loadu(src + c)).store(dst + c);
  }
  for (; c < n; ++c) dst[c] += src[c];
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

// The conv of a whole output row: acc[w * C + c] for w in [0, W), from the padded window (row
// stride row_stride, pixel stride C). Channel blocks are the outer loop, so the window and taps
// of one block (k * (W + k - 1) * 32 + k * k * 32 floats) stay in L1 across the row's pixels,
// instead of streaming all C channels from L2 for every pixel.
inline void conv_row(float* acc, const float* rows, int64_t row_stride, const float* w_taps,
                     const float* bias, int64_t C, int64_t W, int64_t k, int64_t kh_lo,
                     int64_t kh_hi) {
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

// Vectorized helpers shared by the CPU kernels (csrc/cpu/*.cpp): fp32 compute along C with
// at::vec, whatever the storage dtype.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include "derived_cache.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <type_traits>
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

// A depthwise conv weight [C, 1, k, k] (any float dtype) as fp32 taps, what the conv loops read:
// [k * k, C] (one contiguous row of C weights per tap) or, blocked, [ceil(C / 8), k * k, 8] (the
// k * k taps of one channel vector contiguous, lanes past C zero; see RowWindow). flip reverses
// the taps (the kernel rotated by 180 degrees, for the input gradient). A blocked loop over 16
// channels: ATen's strided transposing copy took 27 us at C = 768, k = 7, a fifth of the whole op
// at batch 1.
inline at::Tensor make_conv_taps(const at::Tensor& conv_weight, bool flip, bool blocked) {
  const at::Tensor w = conv_weight.contiguous();
  const int64_t C = w.size(0), kk = w.size(2) * w.size(3);
  constexpr int64_t L = Vec::size();
  const int64_t Cv = (C + L - 1) / L;
  at::Tensor taps = blocked ? at::empty({Cv, kk, L}, w.options().dtype(at::kFloat))
                            : at::empty({kk, C}, w.options().dtype(at::kFloat));
  float* dst = taps.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "conv_taps", [&] {
    const scalar_t* src = w.data_ptr<scalar_t>();
    if (blocked) {  // one vector's 8 channels x k * k taps at a time: 8 rows in, one block out
      for (int64_t v = 0; v < Cv; ++v) {
        float* block = dst + v * kk * L;
        const int64_t lanes = std::min(L, C - v * L);
        for (int64_t i = 0; i < lanes; ++i) {
          const scalar_t* taps_c = src + (v * L + i) * kk;
          for (int64_t t = 0; t < kk; ++t) {
            block[t * L + i] = static_cast<float>(taps_c[flip ? kk - 1 - t : t]);
          }
        }
        for (int64_t i = lanes; i < L; ++i) {
          for (int64_t t = 0; t < kk; ++t) block[t * L + i] = 0.f;
        }
      }
      return;
    }
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

// conv_taps once per weight version (derived_cache.h): rearranged per call, a C = 768, 7 x 7 call
// at batch 1 took 156 instead of 83 us (C = 384: 144 vs 109 us; 2 threads of a Zen 4).
inline at::Tensor conv_taps(const at::Tensor& conv_weight, bool flip = false, bool blocked = false) {
  constexpr int64_t kTapsTag = 1000;  // above every ScalarType, the tags of dtype conversions
  return derived_cache().get(conv_weight, kTapsTag + 2 * flip + blocked,
                             [=](const at::Tensor& w) { return make_conv_taps(w, flip, blocked); });
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

// Scratch memory from a pool kept per thread across calls. In a model the ops run once per block
// between other kernels that evict the cache; a fresh heap buffer per call means cold lines (and,
// above malloc's mmap threshold, page faults) on each first write. ConvNeXt-T fp32 at batch 1,
// pooled vs fresh buffers, interleaved in one process: dwconv_ln 3.95 -> 3.77 ms, mlp 56.1 ->
// 55.7 ms per forward (benchmarks/results/cpu2core_ops.txt). The pool is a stack: buffers alive at
// once on one thread get distinct slots, so instances are destroyed in reverse order of
// construction (automatic storage only; not movable). Buffers are 64-byte aligned
// (c10::alloc_cpu) and uninitialised; those above kKeepBytes are freed on release, not kept.
class ThreadScratch {
 public:
  static constexpr int64_t kKeepBytes = int64_t{4} << 20;

  // `count` elements of `elem_size` bytes (default: floats). Uninitialised.
  explicit ThreadScratch(int64_t count, int64_t elem_size = sizeof(float)) : slot_(depth()++) {
    const int64_t bytes = std::max<int64_t>(count * elem_size, 1);
    std::vector<Buffer>& pool = buffers();
    if (static_cast<int64_t>(pool.size()) <= slot_) pool.resize(slot_ + 1);
    Buffer& b = pool[slot_];
    if (b.bytes < bytes) {
      b.data.reset();
      b.data.reset(c10::alloc_cpu(bytes));
      b.bytes = bytes;
    }
    data_ = b.data.get();
  }
  ~ThreadScratch() {
    --depth();
    Buffer& b = buffers()[slot_];
    if (b.bytes > kKeepBytes) {
      b.data.reset();
      b.bytes = 0;
    }
  }
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;

  template <typename T = float>
  T* data() const {
    return static_cast<T*>(data_);
  }
  // A tensor over the buffer (contiguous, no ownership: valid while this object lives).
  at::Tensor tensor(at::IntArrayRef sizes, const at::TensorOptions& options) const {
    return at::from_blob(data_, sizes, options);
  }

 private:
  struct Free {
    void operator()(void* p) const { c10::free_cpu(p); }
  };
  struct Buffer {
    std::unique_ptr<void, Free> data;
    int64_t bytes = 0;
  };
  static std::vector<Buffer>& buffers() {
    thread_local std::vector<Buffer> pool;
    return pool;
  }
  static int64_t& depth() {
    thread_local int64_t d = 0;
    return d;
  }

  int64_t slot_;
  void* data_;
};

// Where the conv loops find the window's and the taps' numbers: kernel row kh, window pixel j and
// channel vector v of the window at kh * row + j * pixel + v * vec; tap t of vector v at
// t * tap + v * tap_vec. `padded`: channels are padded with zeros to whole vectors, so a C that is
// not a multiple of the vector width ends in a partial vector instead of a scalar tail.
struct ConvLayout {
  int64_t row, pixel, vec, tap, tap_vec;
  bool padded;
};

// Whether the conv of kernel size k runs on the blocked layout (the register-tiled kernels of
// ConvNeXt's sizes; other odd k keep the channels-last loops).
inline bool conv_blocked(int64_t k) { return k == 3 || k == 5 || k == 7; }

// The k zero-padded fp32 input rows around an output row (h - p .. h + p of image n, each
// W + 2p pixels of C channels), kept as a ring so that stepping to the next output row widens
// one new input row instead of k. Each input row is stored twice, in slots s and s + k, so the k
// rows of any window are contiguous. Rows outside the image are never written: the conv loops
// skip them (kh_lo/kh_hi).
//
// Two layouts. Channels-last ([slot][pixel][C]), what the backward's weight gradient reads. And
// blocked ([C / 8][slot][pixel][8], with conv_taps(..., blocked)): the window and taps of one
// channel vector are contiguous (k rows x (W + 2p) x 32 B, k * k x 32 B), so the conv's loop
// over vectors streams through memory. Channels-last, one vector touches 2k + k^2 lines
// C * 4 bytes apart, and at ConvNeXt-T's stage 3/4 shapes (C = 384/768) the window and taps
// (~430 KB at C = 768, W = 7) no longer fit L2: the conv ran at a third of its FMA rate there.
class RowWindow {
 public:
  // Only the padding is zeroed: a row's interior is always widened before it is read.
  RowWindow(int64_t k, int64_t W, int64_t C, bool blocked = false)
      : k_(k), p_(k / 2), W_(W), C_(C), Wp_(W + 2 * (k / 2)), blocked_(blocked),
        Cv_((C + Vec::size() - 1) / Vec::size()),
        slot_(blocked ? Wp_ * Vec::size() : Wp_ * C),
        block_(2 * k * slot_),
        buf_(blocked ? Cv_ * block_ : 2 * k * slot_) {
    const int64_t pad = p_ * (blocked_ ? Vec::size() : C_);
    for (int64_t b = 0; b < (blocked_ ? Cv_ : 1); ++b) {
      for (int64_t s = 0; s < 2 * k_; ++s) {
        float* slot = buf_.data() + b * block_ + s * slot_;
        std::fill(slot, slot + pad, 0.f);
        std::fill(slot + slot_ - pad, slot + slot_, 0.f);
      }
    }
  }

  // The strides for conv_row, with taps from conv_taps(..., blocked()) of a k x k kernel.
  ConvLayout layout() const {
    constexpr int64_t L = Vec::size();
    if (blocked_) return {slot_, L, block_, L, k_ * k_ * L, true};
    return {slot_, C_, L, C_, L, false};
  }
  bool blocked() const { return blocked_; }
  // Channels-last only: the stride between kernel rows.
  int64_t row_stride() const { return slot_; }

  // Rows of image n around output row h, from src (NHWC, H rows of W * C): the window's first row
  // (its kernel row 0, vector 0). Any order of calls is correct; stepping h up by one within an
  // image widens one row.
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
    for (; ih < hi; ++ih) load(src + (n * H + ih) * W_ * C_, ih % k_);
    loaded_end_ = std::max(loaded_end_, hi);
    return buf_.data() + (((lo % k_) + k_) % k_) * slot_;
  }

 private:
  template <typename scalar_t>
  void load(const scalar_t* src, int64_t s) {
    constexpr int64_t L = Vec::size();
    if (!blocked_) {
      float* slot = buf_.data() + s * slot_ + p_ * C_;
      widen(src, slot, W_ * C_);
      std::copy(slot, slot + W_ * C_, slot + k_ * slot_);
      return;
    }
    const float* row;
    if constexpr (std::is_same_v<scalar_t, float>) {
      row = src;
    } else {
      if (static_cast<int64_t>(wide_.size()) < W_ * C_) wide_.resize(W_ * C_);
      widen(src, wide_.data(), W_ * C_);
      row = wide_.data();
    }
    for (int64_t b = 0; b < Cv_; ++b) {
      float* dst = buf_.data() + b * block_ + s * slot_ + p_ * L;
      const int64_t c = b * L, lanes = std::min(L, C_ - c);
      for (int64_t w = 0; w < W_; ++w) {
        const Vec v = lanes == L ? Vec::loadu(row + w * C_ + c) : Vec::loadu(row + w * C_ + c, lanes);
        v.store(dst + w * L);
        v.store(dst + k_ * slot_ + w * L);
      }
    }
  }

  int64_t k_, p_, W_, C_, Wp_;
  bool blocked_;
  int64_t Cv_, slot_, block_;
  ThreadScratch buf_;
  std::vector<float> wide_;  // a reduced-precision row widened to fp32 (blocked layout)
  int64_t n_ = -1, loaded_end_ = 0;  // input rows [.., loaded_end_) of image n_ are in the ring
};

// One kernel row of a tile: a[r] += sum over kw of row[(r + kw) * ps] * wt[kw * ts], r < R. The
// K taps stay in registers and every input vector loaded serves up to K outputs: R + K - 1 loads
// per R * K FMAs (conv_block loads twice per FMA).
template <int K, int R>
inline void conv_tile_row(Vec (&a)[R], const float* row, const float* wt, int64_t ps, int64_t ts) {
  Vec wv[K];
#pragma GCC unroll 16
  for (int kw = 0; kw < K; ++kw) wv[kw] = Vec::loadu(wt + kw * ts);
#pragma GCC unroll 32
  for (int j = 0; j < R + K - 1; ++j) {
    const Vec xv = Vec::loadu(row + j * ps);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const int kw = j - r;
      if (kw >= 0 && kw < K) a[r] = at::vec::fmadd(xv, wv[kw], a[r]);
    }
  }
}

// Accumulator sets of an R-pixel tile (see conv_tile): enough independent FMA chains for narrow
// tiles while S * R sums + K taps + 1 input still fit the 16 AVX2 registers.
constexpr int tile_sets(int R) { return R >= 5 ? 1 : (R >= 3 ? 2 : 4); }

// The widest tile: R sums + K taps + 1 input within the vector registers at K = 7 (AVX2: 8 + 7
// + 1 = 16; AVX-512's 32 take 14 + 7 + 1, and a wider tile loads its taps for more pixels).
constexpr int kConvTileMaxR = Vec::size() == 16 ? 14 : 8;

// R consecutive output pixels x one vector of channels (`lanes` of them valid), kernel size K:
// out[r * C + i] for r < R, i < lanes, from the window at `row` (this tile's first pixel and
// vector) and the vector's taps `wt`. The sums are independent FMA chains, and with FMA latency
// 4-5 and two FMA pipes ~10 are needed to keep the pipes busy: R = 8 (8 sums + 7 taps + 1 input
// = the 16 AVX2 registers at K = 7) measured 1.2x faster than R = 4 and 1.7x faster than
// conv_block at ConvNeXt-T's stage-1 shape (benchmarks/results/cpu2core_ops.txt). Narrow tiles
// (R < 5) add chains by giving successive kernel rows separate sets of sums (kernel row kh into
// set (kh - kh_lo) % S), added at the end.
//
// Blocked: the layout is RowWindow's blocked one, whose pixel and tap strides are one vector.
// As compile-time constants they become the loads' immediate offsets; as run-time strides each
// of the 2K + R - 1 offsets of a kernel row took a register, and at K = 7, R = 8 (21 offsets) the
// compiler kept them in vector registers and on the stack, moved back per load.
template <int K, int R, bool Blocked>
inline void conv_tile(float* out, const float* row, const float* wt, const float* bias,
                      int64_t lanes, int64_t C, const ConvLayout& lay, int64_t kh_lo,
                      int64_t kh_hi) {
  constexpr int S = tile_sets(R);
  constexpr int64_t L = Vec::size();
  const int64_t ps = Blocked ? L : lay.pixel, ts = Blocked ? L : lay.tap;
  Vec a[S][R];
  const Vec b = bias == nullptr ? Vec(0.f) : lanes == L ? Vec::loadu(bias) : Vec::loadu(bias, lanes);
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) a[s][r] = s == 0 ? b : Vec(0.f);
  }
  const int64_t kstep = K * ts;
  int64_t kh = kh_lo;
  for (; kh + S <= kh_hi; kh += S) {
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      conv_tile_row<K, R>(a[s], row + (kh + s) * lay.row, wt + (kh + s) * kstep, ps, ts);
    }
  }
#pragma GCC unroll 8
  for (int s = 0; s + 1 < S; ++s) {
    if (kh + s < kh_hi) {
      conv_tile_row<K, R>(a[s], row + (kh + s) * lay.row, wt + (kh + s) * kstep, ps, ts);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    Vec sum = a[0][r];
#pragma GCC unroll 8
    for (int s = 1; s < S; ++s) sum = sum + a[s][r];
    if (lanes == L) {
      sum.store(out + r * C);
    } else {
      sum.store(out + r * C, lanes);
    }
  }
}

template <int K, bool Blocked>
inline void conv_tile_any(int64_t R, float* out, const float* row, const float* wt,
                          const float* bias, int64_t lanes, int64_t C, const ConvLayout& lay,
                          int64_t kh_lo, int64_t kh_hi) {
  switch (R) {
#define CONVNEXT_FAST_CONV_TILE(r)                                                  \
  case r:                                                                           \
    if constexpr (r <= kConvTileMaxR) {                                             \
      return conv_tile<K, r, Blocked>(out, row, wt, bias, lanes, C, lay, kh_lo, kh_hi); \
    }                                                                               \
    break;
    CONVNEXT_FAST_CONV_TILE(1)
    CONVNEXT_FAST_CONV_TILE(2)
    CONVNEXT_FAST_CONV_TILE(3)
    CONVNEXT_FAST_CONV_TILE(4)
    CONVNEXT_FAST_CONV_TILE(5)
    CONVNEXT_FAST_CONV_TILE(6)
    CONVNEXT_FAST_CONV_TILE(7)
    CONVNEXT_FAST_CONV_TILE(8)
    CONVNEXT_FAST_CONV_TILE(9)
    CONVNEXT_FAST_CONV_TILE(10)
    CONVNEXT_FAST_CONV_TILE(11)
    CONVNEXT_FAST_CONV_TILE(12)
    CONVNEXT_FAST_CONV_TILE(13)
    CONVNEXT_FAST_CONV_TILE(14)
#undef CONVNEXT_FAST_CONV_TILE
    default:
      break;
  }
  TORCH_INTERNAL_ASSERT(false, "conv_tile_any: tile width ", R, " not in [1, ", kConvTileMaxR, "]");
}

// A row of W outputs is cut into ceil(W / kConvTileMaxR) tiles of near-equal width (AVX2, at
// most 8: W = 14: 7 + 7, not 8 + 4 + 2; W = 7: one tile of 7, not 4 + 3). A narrow tile costs more per pixel (more loads per
// FMA, fewer independent chains): at C = 384, W = 14 the 8-, 4- and 2-pixel tiles took 3.6%, 5.3%
// and 7.7% of the op per pixel (benchmarks/results/cpu2core_ops.txt). Every tile is at least 4
// wide once W >= 4. conv_vec_row: one channel vector of such a row, acc[w * C] for w in [0, W)
// (`lanes` channels), from the window `row` of that vector (the row's first pixel) and its taps
// `wt`; conv_row_k: every vector of the row.
template <int K, bool Blocked>
inline void conv_vec_row(float* acc, const float* row, const float* wt, const float* bias,
                         int64_t lanes, int64_t C, int64_t W, const ConvLayout& lay, int64_t kh_lo,
                         int64_t kh_hi) {
  constexpr int64_t kMaxR = kConvTileMaxR;
  const int64_t tiles = (W + kMaxR - 1) / kMaxR;
  const int64_t narrow_w = W / tiles, wide = W % tiles;  // `wide` tiles are one pixel wider
  int64_t w = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t R = narrow_w + (t < wide ? 1 : 0);
    conv_tile_any<K, Blocked>(R, acc + w * C, row + w * lay.pixel, wt, bias, lanes, C, lay, kh_lo,
                              kh_hi);
    w += R;
  }
}

template <int K>
inline void conv_row_k(float* acc, const float* rows, const ConvLayout& lay, const float* w_taps,
                       const float* bias, int64_t C, int64_t W, int64_t kh_lo, int64_t kh_hi) {
  constexpr int64_t L = Vec::size();
  const int64_t vectors = lay.padded ? (C + L - 1) / L : C / L;
  for (int64_t v = 0; v < vectors; ++v) {
    const int64_t c = v * L, lanes = std::min(L, C - c);
    const float* row = rows + v * lay.vec;
    const float* wt = w_taps + v * lay.tap_vec;
    const float* b = bias != nullptr ? bias + c : nullptr;
    if (lay.pixel == L && lay.tap == L) {  // the blocked layout: constant strides
      conv_vec_row<K, true>(acc + c, row, wt, b, lanes, C, W, lay, kh_lo, kh_hi);
    } else {
      conv_vec_row<K, false>(acc + c, row, wt, b, lanes, C, W, lay, kh_lo, kh_hi);
    }
  }
  const int64_t c = vectors * L;
  if (c < C) {  // channels-last: the scalar tail
    for (int64_t w = 0; w < W; ++w) {
      conv_pixel_from(acc + w * C, rows + w * C, lay.row, w_taps, bias, c, C, K, kh_lo, kh_hi);
    }
  }
}

// The conv of a whole output row: acc[w * C + c] for w in [0, W), from a RowWindow's rows (its
// layout `lay`) and taps from conv_taps in the same layout. ConvNeXt's kernel sizes take the
// register-blocked path; channel vectors are the outer loop, so the window and taps of one vector
// stay in L1 across the row. Other odd k (channels-last only): blocks of 4 vectors per pixel.
inline void conv_row(float* acc, const float* rows, const ConvLayout& lay, const float* w_taps,
                     const float* bias, int64_t C, int64_t W, int64_t k, int64_t kh_lo,
                     int64_t kh_hi) {
  switch (k) {
    case 3:
      return conv_row_k<3>(acc, rows, lay, w_taps, bias, C, W, kh_lo, kh_hi);
    case 5:
      return conv_row_k<5>(acc, rows, lay, w_taps, bias, C, W, kh_lo, kh_hi);
    case 7:
      return conv_row_k<7>(acc, rows, lay, w_taps, bias, C, W, kh_lo, kh_hi);
    default:
      break;
  }
  TORCH_INTERNAL_ASSERT(!lay.padded, "conv_row: the blocked layout needs k in {3, 5, 7}");
  const int64_t row_stride = lay.row;
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

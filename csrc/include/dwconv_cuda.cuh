// What the CUDA dwconv_ln kernels (forward, backward) share: the tilings, vector loads and stores,
// the staging of input rows into shared memory, the conv of one thread's strip, and the LayerNorm
// tile kernel that is both the forward and the backward's first kernel. Included by csrc/cuda/*.cu.
//
// Tile of the LayerNorm kernel (forward, and backward K1): a block owns image n, a band of `band`
// output rows and a column tile of q * kPx pixels, with every channel (LayerNorm needs them all). It
// walks the band `r` rows at a time (a step). Thread t < r * q * G owns output row rr = t / (q * G)
// of the step, pixel strip qq = (t / G) % q (kPx consecutive pixels) and channel group g = t % G:
// channel vectors g, g + G, ... (NCV of them, kVec channels each). Its kVec x kPx accumulators per
// vector stay in registers from the conv to the store, so each input value loaded feeds kVec x K
// FMAs. Channels are padded to cp = 4 * ceil(C / 4) (zero taps, zero inputs) and never further.
//
// Staged tilings keep a rolling window of S = K + r - 1 input rows (cols = q * kPx + K - 1 columns,
// cp channels, the input dtype) in shared memory: input row ih sits in slot (ih - h0 + P) % S, each
// step stages only the rows it newly needs, and rows or columns outside the image are staged as
// zeros (the conv's padding), so the inner loop has no bounds checks. Tilings whose window would
// not fit kSharedBudget (large C) read the inputs from global memory (L1) with bounds checks.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "dwconv_limits.h"

namespace convnext_fast {

// Threads a block has at most (and a tiling aims for): 8 warps, so the launch bound leaves a thread
// up to 255 registers for its accumulators.
constexpr int kMaxThreads = 256;
constexpr int kTargetThreads = kMaxThreads;
// A staged tiling with fewer threads than this (the window of a large C leaves room for few
// pixels) loses to the direct one, whose threads are not limited by shared memory.
constexpr int kMinStagedThreads = 128;
// Rows a step computes at most, pixel strips a row tile holds at most, and output rows a block of
// the LayerNorm kernel covers (taller bands re-stage fewer halo rows, shorter ones give more blocks).
constexpr int kMaxStepRows = 8;
constexpr int kMaxStrips = 16;
constexpr int kBandRows = 16;
// The backward's dx/dW kernel: rows a step computes at most, rows a block covers, and channel
// vectors a block covers at most.
constexpr int kDxMaxStepRows = 16;
constexpr int kDxBandRows = 32;
constexpr int kDxMaxGroups = 32;

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ inline size_t align16(size_t b) { return (b + 15) / 16 * 16; }

// The rolling window: S = K + r - 1 rows of q * kPx + K - 1 columns of `chans` channels.
inline size_t window_bytes(int K, int r, int q, int chans, size_t elem) {
  return align16(size_t(K + r - 1) * (q * kPx + K - 1) * chans * elem);
}

// Tiling of the LayerNorm kernel: a pure function of the shape and dtype (see kSharedBudget).
struct LnTiling {
  int cv, ncv, groups;  // channel vectors ceil(C / kVec); vectors a thread; ceil(cv / ncv)
  int q, r, band;       // strips per row tile, rows per step, rows per block
  bool staged;
  int threads, tiles_w, bands;
  size_t smem;
};

// Shared memory of the LayerNorm kernel after the window: a float2 partial per pixel of a step and
// channel group, the float2 statistics per pixel of a step, and for the backward the channel sums
// of each (row, strip) of the block: 3 x cp floats, each element owned by one thread.
__host__ __device__ inline size_t ln_partials_bytes(int r, int q, int groups) {
  return align16(size_t(2) * r * q * kPx * groups * sizeof(float));
}
__host__ __device__ inline size_t ln_stat_bytes(int r, int q) {
  return align16(size_t(2) * r * q * kPx * sizeof(float));
}

inline size_t ln_smem_bytes(int K, int r, int q, int groups, int cp, size_t elem, bool staged,
                            bool bwd) {
  return (staged ? window_bytes(K, r, q, cp, elem) : 0) + ln_partials_bytes(r, q, groups) +
         ln_stat_bytes(r, q) + (bwd ? size_t(3) * r * q * cp * sizeof(float) : 0);
}

// Rows of output computed for H rows in bands of `band` rows, r rows a step (the last step of a band
// may run past its end).
inline int64_t rows_computed(int H, int band, int r) {
  const int bands = ceil_div(H, band), last = H - (bands - 1) * band;
  return int64_t(bands - 1) * band + int64_t(ceil_div(last, r)) * r;
}

// Useful threads of a tiling: its threads scaled by the fraction of computed pixels in the image.
inline double useful_threads(int threads, int H, int W, int q, int r, int band) {
  const int tw = q * kPx;
  return double(int64_t(threads) * W * H) /
         (double(int64_t(ceil_div(W, tw)) * tw) * double(rows_computed(H, band, r)));
}

inline int band_rows(int H, int r, int target) { return r * ceil_div(std::min(H, target), r); }

inline LnTiling ln_tiling(int K, int C, int H, int W, size_t elem, bool bwd) {
  LnTiling t{};
  t.cv = ceil_div(C, kVec);
  t.ncv = ceil_div(t.cv, kMaxThreads);  // 1 .. 4 for C <= kMaxC
  t.groups = ceil_div(t.cv, t.ncv);
  const int cp = t.cv * kVec, G = t.groups;
  const int q_max = std::min({ceil_div(W, kPx), kMaxStrips, std::max(1, kTargetThreads / G)});
  const int r_max = std::min(H, kMaxStepRows);
  // Staged: the most useful threads (up to kTargetThreads) whose window fits, wider tiles on ties.
  int best_q = 0, best_r = 0, best_threads = 0;
  double best = 0.0;
  if (t.ncv == 1) {
    for (int q = 1; q <= q_max; ++q) {
      for (int r = 1; r <= r_max && r * q * G <= kTargetThreads; ++r) {
        if (ln_smem_bytes(K, r, q, G, cp, elem, true, bwd) > size_t(kSharedBudget)) break;
        const double u = useful_threads(r * q * G, H, W, q, r, band_rows(H, r, kBandRows));
        if (u >= best) best = u, best_q = q, best_r = r, best_threads = r * q * G;
      }
    }
  }
  const int reachable = std::min(kTargetThreads, std::max(G, q_max * r_max * G));
  t.staged = best_threads >= std::min(kMinStagedThreads, reachable);
  if (t.staged) {
    t.q = best_q;
    t.r = best_r;
  } else {
    t.q = q_max;
    t.r = std::max(1, std::min(r_max, kTargetThreads / (t.q * G)));
  }
  t.band = band_rows(H, t.r, kBandRows);
  t.threads = ceil_div(t.r * t.q * G, 32) * 32;
  t.tiles_w = ceil_div(W, t.q * kPx);
  t.bands = ceil_div(H, t.band);
  t.smem = ln_smem_bytes(K, t.r, t.q, G, cp, elem, t.staged, bwd);
  return t;
}

// Tiling of the backward's dx/dW kernel: a block owns image n, a band, a column tile of q * kPx
// pixels and a chunk of gc channel vectors, with windows of dz and x. Thread t < r * q * gc owns
// dx strip (rr, qq, g) as in the LayerNorm kernel; thread t < K * gc owns the dW taps of kernel row
// kh = t / gc of vector g = t % gc for the whole band. threads = max(r * q, K) * gc.
struct DxTiling {
  int cv, gc, chunks, q, r, band, threads, tiles_w, bands;
  size_t smem;
};

inline DxTiling dx_tiling(int K, int C, int H, int W, size_t elem) {
  DxTiling t{};
  t.cv = ceil_div(C, kVec);
  // The largest chunk up to kDxMaxGroups vectors that divides C's vectors (no idle threads in the
  // last chunk), unless only tiny divisors exist.
  int gc = std::min(t.cv, kDxMaxGroups);
  while (t.cv % gc != 0 && gc > kDxMaxGroups / 2) --gc;
  if (t.cv % gc != 0) gc = std::min(t.cv, kDxMaxGroups);
  const int q_cap = std::min(ceil_div(W, kPx), kMaxStrips);
  const int r_cap = std::min(H, kDxMaxStepRows);
  for (;; gc = std::max(1, gc / 2)) {
    int best_q = 0, best_r = 0, best_threads = 0;
    double best = 0.0;
    for (int q = 1; q <= q_cap; ++q) {
      for (int r = 1; r <= r_cap; ++r) {
        const int threads = std::max(r * q, K) * gc;
        if (threads > std::max(kTargetThreads, K * gc)) break;
        if (2 * window_bytes(K, r, q, gc * kVec, elem) > size_t(kSharedBudget)) break;
        const double u = useful_threads(r * q * gc, H, W, q, r, band_rows(H, r, kDxBandRows));
        if (u >= best) best = u, best_q = q, best_r = r, best_threads = threads;
      }
    }
    if (best_threads > 0 || gc == 1) {
      t.q = std::max(best_q, 1);
      t.r = std::max(best_r, 1);
      break;
    }
  }
  t.gc = gc;
  t.chunks = ceil_div(t.cv, gc);
  t.band = band_rows(H, t.r, kDxBandRows);
  t.threads = ceil_div(std::max(t.r * t.q, K) * gc, 32) * 32;
  t.tiles_w = ceil_div(W, t.q * kPx);
  t.bands = ceil_div(H, t.band);
  t.smem = 2 * window_bytes(K, t.r, t.q, gc * kVec, elem);
  return t;
}

// Lets `kernel` take `bytes` of dynamic shared memory: above the 48 KiB default a kernel must opt
// in. The tilings stay within kSharedBudget, which every supported GPU allows.
template <typename Kernel>
inline void request_shared_memory(Kernel kernel, size_t bytes, const char* op, int64_t C) {
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= limit, op, ": C = ", C, " needs ", bytes,
              " bytes of shared memory per block, this GPU allows ", limit);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  }
}

// kVec values of T as one aligned word (8 bytes for half types, 16 for float) and their fp32 form.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using raw = float4;
  static __device__ __forceinline__ float4 to_f32(float4 r) { return r; }
  static __device__ __forceinline__ float4 from_f32(float4 v) { return v; }
};
template <>
struct Vec<c10::Half> {
  using raw = uint2;
  static __device__ __forceinline__ float4 to_f32(uint2 r) {
    const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&r.x));
    const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&r.y));
    return make_float4(a.x, a.y, b.x, b.y);
  }
  static __device__ __forceinline__ uint2 from_f32(float4 v) {
    const __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
    return make_uint2(*reinterpret_cast<const uint32_t*>(&a), *reinterpret_cast<const uint32_t*>(&b));
  }
};
template <>
struct Vec<c10::BFloat16> {
  using raw = uint2;
  static __device__ __forceinline__ float4 to_f32(uint2 r) {
    return make_float4(__uint_as_float(r.x << 16), __uint_as_float(r.x & 0xffff0000u),
                       __uint_as_float(r.y << 16), __uint_as_float(r.y & 0xffff0000u));
  }
  static __device__ __forceinline__ uint2 from_f32(float4 v) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    return make_uint2(*reinterpret_cast<const uint32_t*>(&a), *reinterpret_cast<const uint32_t*>(&b));
  }
};

// Channels c .. c + kVec of one pixel at p (global memory): one vector access when `vec` (C a
// multiple of kVec and the tensor aligned), else element by element for the n < kVec valid ones.
template <typename T>
__device__ __forceinline__ float4 load_vec(const T* p, int n, bool vec) {
  if (vec) return Vec<T>::to_f32(*reinterpret_cast<const typename Vec<T>::raw*>(p));
  float f[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) f[e] = e < n ? static_cast<float>(p[e]) : 0.f;
  return make_float4(f[0], f[1], f[2], f[3]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, float4 v, int n, bool vec) {
  if (vec) {
    *reinterpret_cast<typename Vec<T>::raw*>(p) = Vec<T>::from_f32(v);
    return;
  }
  const float f[kVec] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    if (e < n) p[e] = static_cast<T>(f[e]);
  }
}

__device__ __forceinline__ void fma4(float4& acc, float4 a, float4 b) {
  acc.x = fmaf(a.x, b.x, acc.x);
  acc.y = fmaf(a.y, b.y, acc.y);
  acc.z = fmaf(a.z, b.z, acc.z);
  acc.w = fmaf(a.w, b.w, acc.w);
}

__device__ __forceinline__ float sum4(float4 v, int n) {
  return v.x + (n > 1 ? v.y : 0.f) + (n > 2 ? v.z : 0.f) + (n > 3 ? v.w : 0.f);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Stages input row ih of one NHWC image into a window slot: `cols` columns from iw = iw0, channels
// c_begin .. c_begin + chans (zeros outside the image and from C on). The block's threads take
// consecutive vectors, so the global reads coalesce along C.
template <typename T>
__device__ __forceinline__ void stage_row(T* __restrict__ slot, const T* __restrict__ img, int ih,
                                          int iw0, int cols, int c_begin, int chans, int C, int H,
                                          int W, bool vec) {
  using raw = typename Vec<T>::raw;
  const int nv = chans / kVec;
  const bool row_in = ih >= 0 && ih < H;
  for (int i = threadIdx.x; i < cols * nv; i += blockDim.x) {
    const int col = i / nv, c = c_begin + (i - col * nv) * kVec, iw = iw0 + col;
    T* dst = slot + col * chans + (c - c_begin);
    const bool in = row_in && iw >= 0 && iw < W && c < C;
    const T* src = img + (int64_t(ih) * W + iw) * C + c;
    if (vec) {
      *reinterpret_cast<raw*>(dst) = in ? *reinterpret_cast<const raw*>(src) : raw{};
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) dst[e] = in && c + e < C ? src[e] : T(0.f);
    }
  }
}

// One kernel row of the conv of a thread's strip, for one channel vector: acc[p] += sum over kw of
// in[col0 + p + kw] * taps[kw], in[j] at base + j * col_stride. The thread slides along the row:
// each of the kPx + K - 1 inputs is loaded once and fed to every tap it meets from registers.
// kStaged: base is a window slot, always in bounds. Else base is the image row in global memory
// (or null for a row outside the image) and columns outside [0, W) read as zero.
template <typename T, int K, bool kStaged>
__device__ __forceinline__ void conv_row(float4 (&acc)[kPx], const T* __restrict__ base,
                                         int col_stride, int col0, int W, int n, bool vec,
                                         const float* __restrict__ taps, int cp) {
  float4 wk[K];
#pragma unroll
  for (int kw = 0; kw < K; ++kw) wk[kw] = __ldg(reinterpret_cast<const float4*>(taps + kw * cp));
#pragma unroll
  for (int j = 0; j < kPx + K - 1; ++j) {
    float4 v;
    if (kStaged) {
      v = Vec<T>::to_f32(*reinterpret_cast<const typename Vec<T>::raw*>(base + j * col_stride));
    } else {
      const int iw = col0 + j;
      v = iw >= 0 && iw < W ? load_vec(base + int64_t(iw) * col_stride, n, vec)
                            : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      const int p = j - kw;  // output pixel col0 + P + p reads this input through tap kw
      if (p >= 0 && p < kPx) fma4(acc[p], v, wk[kw]);
    }
  }
}

// Arguments of the LayerNorm tile kernel. prm is fp32 [K * K + 3, cp]: taps (row kh * K + kw),
// conv bias (zeros without one), ln_weight, ln_bias; zero from C on.
template <typename T>
struct LnArgs {
  const T* x;
  const float* prm;
  T* out;             // forward: y; backward: dz
  float* mean;        // forward: written; backward: read
  float* rstd;
  const T* grad_y;    // backward only
  float* part;        // backward only: [tiles, 3, cp] sums of dz, grad_y * xhat, grad_y
  int H, W, C, cp, groups, q, r, band, tiles_w;
  float eps;
  bool vec;
};

// The LayerNorm tile kernel (tiling: the top of this file and ln_tiling). Per step: stage the new
// window rows; conv into registers; per-thread sums per pixel to shared memory; a warp per pixel
// reduces them over the channel groups (fixed order: lanes stride the groups, then a butterfly);
// then the epilogue from registers.
//   Forward: statistics by groups (sum, then the centered sum of squares combined exactly, so a
//   large mean does not cancel), y = (z - mean) * rstd * ln_w + ln_b, mean and rstd stored.
//   Backward (K1): z recomputed, xhat = (z - mean) * rstd with the saved statistics, g = grad_y *
//   ln_w, dz = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat)) stored in x's dtype. Each thread
//   sums dz, grad_y * xhat and grad_y over its pixels (a step's pixels in order, then steps in
//   order); at the end of the band the block's (row, strip) slots are added in slot order into its
//   row of part.
//
// Two staged half-precision blocks an SM fit 128 registers a thread. The other instances hold more
// live state (fp32 windows, several channel vectors) and, left to aim for two blocks, ptxas spills
// rather than use the registers one block allows.
template <typename T, int K, int NCV, bool kStaged, bool kBwd>
__global__ void __launch_bounds__(kMaxThreads, kStaged && sizeof(T) == 2 ? 2 : 1)
    dwconv_ln_tile_kernel(const LnArgs<T> a) {
  constexpr int P = K / 2;
  extern __shared__ float4 smem[];
  const int H = a.H, W = a.W, C = a.C, cp = a.cp, G = a.groups, q = a.q, r = a.r;
  const int TW = q * kPx, S = K + r - 1, cols = TW + K - 1, step_pixels = r * TW;
  const int tw = blockIdx.x % a.tiles_w, band = blockIdx.x / a.tiles_w;
  const int64_t n = blockIdx.y;
  const int w0 = tw * TW, h0 = band * a.band, h_end = min(h0 + a.band, H);

  T* window = reinterpret_cast<T*>(smem);
  const size_t window_b = kStaged ? align16(size_t(S) * cols * cp * sizeof(T)) : 0;
  char* after_window = reinterpret_cast<char*>(smem) + window_b;
  float2* red = reinterpret_cast<float2*>(after_window);
  float2* stat = reinterpret_cast<float2*>(after_window + ln_partials_bytes(r, q, G));
  float* sums = reinterpret_cast<float*>(after_window + ln_partials_bytes(r, q, G) +
                                         ln_stat_bytes(r, q));

  const int t = threadIdx.x;
  const bool active = t < r * q * G;
  const int rr = t / (q * G), qq = (t / G) % q, g = t % G;
  const T* x_img = a.x + n * H * int64_t(W) * C;
  int nvec[NCV];  // valid channels of each of the thread's vectors
  int n_thread = 0;
#pragma unroll
  for (int i = 0; i < NCV; ++i) {
    nvec[i] = active ? max(0, min(kVec, C - (g + i * G) * kVec)) : 0;
    n_thread += nvec[i];
  }
  const float* taps = a.prm;
  const float* bias = a.prm + K * K * cp;
  const float* ln_w = bias + cp;
  const float* ln_b = ln_w + cp;

  // The thread's channel sums (dz, grad_y * xhat, grad_y) over its pixels, in its own elements of
  // its (row, strip) slot: shared memory rather than registers, which the accumulators fill.
  float* my_sums = sums + (rr * q + qq) * 3 * cp;
  if (kBwd && active) {
#pragma unroll
    for (int i = 0; i < NCV; ++i) {
      if (nvec[i] == 0) continue;
      const int c0 = (g + i * G) * kVec;
      for (int k = 0; k < 3; ++k) {
        *reinterpret_cast<float4*>(my_sums + k * cp + c0) = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
  }

  int next_row = h0 - P;  // the next input row to stage
  for (int hs = h0; hs < h_end; hs += r) {
    if (kStaged) {
      const int last = min(hs + r, h_end) - 1 + P;
      for (; next_row <= last; ++next_row) {
        stage_row(window + ((next_row - h0 + P) % S) * cols * cp, x_img, next_row, w0 - P, cols, 0,
                  cp, C, H, W, a.vec);
      }
      __syncthreads();
    }

    const int h = hs + rr;
    const bool row_active = active && h < h_end;
    float4 acc[NCV][kPx];
#pragma unroll
    for (int i = 0; i < NCV; ++i) {
      const float4 b0 = nvec[i] > 0 ? *reinterpret_cast<const float4*>(bias + (g + i * G) * kVec)
                                    : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int p = 0; p < kPx; ++p) acc[i][p] = b0;
    }
    if (row_active) {
#pragma unroll 1
      for (int kh = 0; kh < K; ++kh) {
        const T* base;
        if (kStaged) {
          base = window + ((h + kh - h0) % S) * cols * cp + qq * kPx * cp;
        } else {
          const int ih = h + kh - P;
          if (ih < 0 || ih >= H) continue;
          base = x_img + int64_t(ih) * W * C;
        }
#pragma unroll
        for (int i = 0; i < NCV; ++i) {
          if (nvec[i] == 0) continue;
          const int c0 = (g + i * G) * kVec;
          conv_row<T, K, kStaged>(acc[i], base + c0, kStaged ? cp : C, w0 + qq * kPx - P, W,
                                  nvec[i], a.vec, taps + kh * K * cp + c0, cp);
        }
      }
    }

    // Per-thread sums per pixel: forward (sum z, centered sum of squares about the thread's mean),
    // backward (sum g, sum g * xhat).
    const int64_t pix_row = (n * H + h) * int64_t(W);
    float rs[kBwd ? kPx : 1];
#pragma unroll
    for (int p = 0; p < kPx; ++p) {
      const int w = w0 + qq * kPx + p;
      if (!row_active || w >= W) continue;
      float2 s = make_float2(0.f, 0.f);
      if (!kBwd) {
#pragma unroll
        for (int i = 0; i < NCV; ++i) s.x += sum4(acc[i][p], nvec[i]);
        const float m = s.x / n_thread;
#pragma unroll
        for (int i = 0; i < NCV; ++i) {
          const float4 d = make_float4(acc[i][p].x - m, acc[i][p].y - m, acc[i][p].z - m,
                                       acc[i][p].w - m);
          s.y += sum4(make_float4(d.x * d.x, d.y * d.y, d.z * d.z, d.w * d.w), nvec[i]);
        }
      } else {
        const float mu = a.mean[pix_row + w];
        rs[p] = a.rstd[pix_row + w];
#pragma unroll
        for (int i = 0; i < NCV; ++i) {
          if (nvec[i] == 0) continue;
          const int c0 = (g + i * G) * kVec;
          float4& xh = acc[i][p];
          xh = make_float4((xh.x - mu) * rs[p], (xh.y - mu) * rs[p], (xh.z - mu) * rs[p],
                           (xh.w - mu) * rs[p]);
          const float4 gy = load_vec(a.grad_y + (pix_row + w) * C + c0, nvec[i], a.vec);
          const float4 lw = *reinterpret_cast<const float4*>(ln_w + c0);
          const float4 gg = make_float4(gy.x * lw.x, gy.y * lw.y, gy.z * lw.z, gy.w * lw.w);
          s.x += sum4(gg, nvec[i]);
          s.y += sum4(make_float4(gg.x * xh.x, gg.y * xh.y, gg.z * xh.z, gg.w * xh.w), nvec[i]);
        }
      }
      red[(rr * TW + qq * kPx + p) * G + g] = s;
    }
    __syncthreads();

    const int warp = t / 32, lane = t % 32, warps = blockDim.x / 32;
    for (int pix = warp; pix < step_pixels; pix += warps) {
      const int ph = hs + pix / TW, pw = w0 + pix % TW;
      if (ph >= h_end || pw >= W) continue;
      const float2* pr = red + pix * G;
      float s1 = 0.f, s2 = 0.f;
      for (int j = lane; j < G; j += 32) {
        s1 += pr[j].x;
        if (kBwd) s2 += pr[j].y;
      }
      s1 = warp_sum(s1);
      if (!kBwd) {
        // Groups combined exactly: M2 = sum_j M2_j + (S_j - n_j * mean)^2 / n_j.
        const float mean = s1 / C;
        for (int j = lane; j < G; j += 32) {
          int nj = 0;
#pragma unroll
          for (int i = 0; i < NCV; ++i) nj += max(0, min(kVec, C - (j + i * G) * kVec));
          const float d = pr[j].x - nj * mean;
          s2 += pr[j].y + d * d / nj;
        }
        s2 = warp_sum(s2);
        const float rstd = rsqrtf(s2 / C + a.eps);
        if (lane == 0) {
          stat[pix] = make_float2(mean, rstd);
          a.mean[(n * H + ph) * int64_t(W) + pw] = mean;
          a.rstd[(n * H + ph) * int64_t(W) + pw] = rstd;
        }
      } else {
        s2 = warp_sum(s2);
        if (lane == 0) stat[pix] = make_float2(s1 / C, s2 / C);
      }
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < NCV; ++i) {
      if (!row_active || nvec[i] == 0) continue;
      const int c0 = (g + i * G) * kVec;
      const float4 lw = *reinterpret_cast<const float4*>(ln_w + c0);
      const float4 lb = *reinterpret_cast<const float4*>(ln_b + c0);
      float4 s_dz = make_float4(0.f, 0.f, 0.f, 0.f), s_dlw = s_dz, s_dlb = s_dz;
#pragma unroll
      for (int p = 0; p < kPx; ++p) {
        const int w = w0 + qq * kPx + p;
        if (w >= W) continue;
        const float2 st = stat[rr * TW + qq * kPx + p];
        T* dst = a.out + (pix_row + w) * C + c0;
        const float4 v = acc[i][p];
        if (!kBwd) {
          store_vec(dst,
                    make_float4(fmaf((v.x - st.x) * st.y, lw.x, lb.x),
                                fmaf((v.y - st.x) * st.y, lw.y, lb.y),
                                fmaf((v.z - st.x) * st.y, lw.z, lb.z),
                                fmaf((v.w - st.x) * st.y, lw.w, lb.w)),
                    nvec[i], a.vec);
        } else {
          const float4 gy = load_vec(a.grad_y + (pix_row + w) * C + c0, nvec[i], a.vec);
          const float4 dz = make_float4(rs[p] * (gy.x * lw.x - st.x - v.x * st.y),
                                        rs[p] * (gy.y * lw.y - st.x - v.y * st.y),
                                        rs[p] * (gy.z * lw.z - st.x - v.z * st.y),
                                        rs[p] * (gy.w * lw.w - st.x - v.w * st.y));
          store_vec(dst, dz, nvec[i], a.vec);
          s_dz = make_float4(s_dz.x + dz.x, s_dz.y + dz.y, s_dz.z + dz.z, s_dz.w + dz.w);
          fma4(s_dlw, gy, v);
          s_dlb = make_float4(s_dlb.x + gy.x, s_dlb.y + gy.y, s_dlb.z + gy.z, s_dlb.w + gy.w);
        }
      }
      if (kBwd) {
        const float4 add[3] = {s_dz, s_dlw, s_dlb};
#pragma unroll
        for (int k = 0; k < 3; ++k) {
          float4& m = *reinterpret_cast<float4*>(my_sums + k * cp + c0);
          m = make_float4(m.x + add[k].x, m.y + add[k].y, m.z + add[k].z, m.w + add[k].w);
        }
      }
    }
  }

  if (kBwd) {
    __syncthreads();
    float* out = a.part + (n * gridDim.x + blockIdx.x) * 3 * cp;
    for (int i = t; i < 3 * cp; i += blockDim.x) {
      float s = 0.f;
      for (int slot = 0; slot < r * q; ++slot) s += sums[slot * 3 * cp + i];
      out[i] = s;
    }
  }
}

}  // namespace convnext_fast

// What the CUDA dwconv_ln kernels (forward, backward) share: the tile shape, the channel limit,
// a warp reduction and the depthwise conv of one row tile. Included by csrc/cuda/*.cu only.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "dwconv_limits.h"

namespace convnext_fast {

constexpr int kMaxThreads = 512;

// Lets `kernel` take `dynamic_bytes` of dynamic shared memory next to its `static_bytes`: above
// the 48 KiB default a kernel must opt in, and the opt-in limit is per GPU (sm_80 163 KiB, sm_86/89
// 99 KiB, sm_90 227 KiB), so a C that does not fit fails here with the numbers, not as "invalid
// argument" from the runtime. backends/_cpp.py checks the same limit and falls back.
template <typename Kernel>
inline void request_shared_memory(Kernel kernel, size_t dynamic_bytes, size_t static_bytes,
                                  const char* op, int64_t C) {
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(dynamic_bytes + static_bytes <= limit, op, ": C = ", C, " needs ",
              dynamic_bytes + static_bytes, " bytes of shared memory per block, this GPU allows ",
              limit);
  if (dynamic_bytes + static_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dynamic_bytes)));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Channel c of the kTileW output pixels (h, w0 .. w0 + kTileW) of a 'same'-padded depthwise KxK
// conv: acc[q] = init + sum_{kh, kw} img[h + kh - P, w0 + q + kw - P, c] * taps[(kh * K + kw) * C + c].
// img is one NHWC image (row_stride = W * C); taps are transposed to [K * K, C] so loads coalesce
// across the threads of a block (consecutive c). The thread slides along the row: each input of a
// kernel row is loaded once and fed to all K taps from registers. kUnrollRows unrolls the kernel
// rows (K: fastest; 1: fewer registers where the caller holds more state).
template <int K, int kUnrollRows, typename in_t>
__device__ __forceinline__ void conv_row_tile(const in_t* __restrict__ img, const float* __restrict__ taps,
                                              int h, int w0, int H, int W, int C, int64_t row_stride,
                                              int c, float init, float (&acc)[kTileW]) {
  constexpr int P = K / 2;
#pragma unroll
  for (int q = 0; q < kTileW; ++q) acc[q] = init;
#pragma unroll(kUnrollRows)
  for (int kh = 0; kh < K; ++kh) {
    const int ih = h + kh - P;
    if (ih < 0 || ih >= H) continue;
    const in_t* row = img + ih * row_stride + c;
    float wk[K];
#pragma unroll
    for (int kw = 0; kw < K; ++kw) wk[kw] = taps[(kh * K + kw) * C + c];
#pragma unroll
    for (int j = 0; j < kTileW + K - 1; ++j) {
      const int iw = w0 + j - P;
      const float v = (iw >= 0 && iw < W) ? static_cast<float>(row[int64_t(iw) * C]) : 0.f;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
        const int q = j - kw;  // output pixel fed by input column j through tap kw
        if (q >= 0 && q < kTileW) acc[q] = fmaf(v, wk[kw], acc[q]);
      }
    }
  }
}

}  // namespace convnext_fast

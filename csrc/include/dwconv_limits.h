// The limits of the CUDA dwconv_ln kernels, in a header without CUDA includes: the kernels
// (dwconv_cuda.cuh) and ops.cpp's limits() read the same constants, so Python asks the extension
// instead of mirroring them (convnext_fast/backends/_cpp.py).
#pragma once

#include <cstdint>

namespace convnext_fast {

// A block owns kTileW consecutive pixels of one image row.
constexpr int kTileW = 8;
// kTileW fp32 rows of C channels in shared memory: 128 KiB at C = 4096 (opted in above the default
// 48 KiB; see request_shared_memory for the per-GPU limits).
constexpr int64_t kMaxC = 4096;
// The backward's dz kernel adds 3 x kTileW fp32 per-pixel statistics in static shared memory.
constexpr int64_t kBwdStaticSharedBytes = 3 * kTileW * sizeof(float);
// Images and rows index grid dimensions y and z.
constexpr int64_t kMaxGridYZ = 65535;
// Kernel sizes the CUDA kernels are instantiated for.
constexpr int kCudaKernelSizes[] = {3, 5, 7};

}  // namespace convnext_fast

// The limits and tile constants of the CUDA dwconv_ln kernels, in a header without CUDA includes:
// the kernels (dwconv_cuda.cuh) and ops.cpp's cuda_limits() read the same constants, so Python asks
// the extension instead of mirroring them (convnext_fast/backends/_cpp.py).
#pragma once

#include <cstdint>

namespace convnext_fast {

// A thread owns kVec consecutive channels of kPx consecutive output pixels of one row.
constexpr int kVec = 4;
constexpr int kPx = 8;
// Reported to Python as "tile_w": the pixels of a thread's strip, the unit tile widths come in.
constexpr int kTileW = kPx;
// Channels up to 4096: a block holds every channel of its pixels (LayerNorm), at most four channel
// vectors per thread (NCV, dwconv_cuda.cuh) and kMaxThreads threads.
constexpr int64_t kMaxC = 4096;
// No kernel asks for more dynamic shared memory than this (tilings that would are not chosen), so
// the limit fits every GPU from sm_80 on (the smallest opt-in, sm_86/89, is 99 KiB) and the tiling,
// hence every fixed-order sum, depends on the shape only, never on the GPU.
constexpr int64_t kSharedBudget = 96 * 1024;
// Static shared memory of the kernels (all of their shared memory is dynamic).
constexpr int64_t kBwdStaticSharedBytes = 0;
// Images index grid dimension y.
constexpr int64_t kMaxGridYZ = 65535;
// Kernel sizes the CUDA kernels are instantiated for.
constexpr int kCudaKernelSizes[] = {3, 5, 7};

}  // namespace convnext_fast

// dwconv_ln forward on CUDA: depthwise kxk conv ('same' padding, stride 1) + bias, then LayerNorm
// over C, for channels_last (NHWC) tensors.
//
// A block owns kTileW consecutive pixels of one image row and all C channels.
//   1. conv: a thread owns a channel (threads are consecutive along C, so every load and store is
//      coalesced) and slides along the row: for each kernel row it loads the kTileW + k - 1 inputs
//      of that channel once and feeds all k taps from registers, ~k(1 + (k-1)/kTileW) loads per
//      output instead of k^2. Taps are pre-transposed to [k*k, C] so weight loads coalesce too.
//      Results go to shared memory as fp32 [kTileW, C].
//   2. statistics: one warp per pixel, two passes over the shared row (mean, then the centered
//      variance: no cancellation for large means) with shuffle reductions, fp32.
//   3. normalise, scale and shift, store (coalesced along C).
// Shared memory is kTileW * C * 4 bytes (24 KiB at C = 768, 96 KiB at C = 3072: opted in above
// the default 48 KiB).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <type_traits>

#include "../include/dwconv_cuda.cuh"
#include "../include/dwconv_ln.h"

namespace convnext_fast {
namespace {

template <typename scalar_t, int K>
__global__ void __launch_bounds__(kMaxThreads)
    dwconv_ln_fwd_kernel(const scalar_t* __restrict__ x, const float* __restrict__ w_taps,
                         const scalar_t* __restrict__ bias, const scalar_t* __restrict__ ln_w,
                         const scalar_t* __restrict__ ln_b, scalar_t* __restrict__ y,
                         float* __restrict__ mean_out, float* __restrict__ rstd_out, int H, int W,
                         int C, float eps) {
  extern __shared__ float tile[];  // [kTileW, C]
  const int w0 = blockIdx.x * kTileW, h = blockIdx.y;
  const int64_t n = blockIdx.z;
  const int pixels = min(kTileW, W - w0);
  const int64_t row_stride = int64_t(W) * C;
  const scalar_t* x_img = x + n * H * row_stride;

  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float acc[kTileW];
    conv_row_tile<K, K>(x_img, w_taps, h, w0, H, W, C, row_stride, c,
                        bias != nullptr ? static_cast<float>(bias[c]) : 0.f, acc);
#pragma unroll
    for (int q = 0; q < kTileW; ++q) {
      if (q < pixels) tile[q * C + c] = acc[q];
    }
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int64_t pix0 = (n * H + h) * W + w0;
  for (int q = warp; q < pixels; q += warps) {
    float* v = tile + q * C;
    float s = 0.f;
    for (int c = lane; c < C; c += 32) s += v[c];
    const float mu = warp_sum(s) / C;
    float sq = 0.f;
    for (int c = lane; c < C; c += 32) {
      const float d = v[c] - mu;
      sq += d * d;
    }
    const float rstd = rsqrtf(warp_sum(sq) / C + eps);
    // Each lane rewrites only the elements it read itself, so no barrier is needed here.
    for (int c = lane; c < C; c += 32) v[c] = (v[c] - mu) * rstd;
    if (lane == 0) {
      mean_out[pix0 + q] = mu;
      rstd_out[pix0 + q] = rstd;
    }
  }
  __syncthreads();

  scalar_t* out = y + pix0 * C;
  for (int q = 0; q < pixels; ++q) {
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      out[int64_t(q) * C + c] = static_cast<scalar_t>(
          fmaf(tile[q * C + c], static_cast<float>(ln_w[c]), static_cast<float>(ln_b[c])));
    }
  }
}

template <typename scalar_t, int K>
void launch(const at::Tensor& x, const at::Tensor& w_taps, const at::Tensor& b,
            const at::Tensor& lw, const at::Tensor& lb, at::Tensor& y, at::Tensor& mean,
            at::Tensor& rstd, float eps) {
  const int N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int threads = std::min(kMaxThreads, std::max(64, (C + 31) / 32 * 32));
  const size_t smem = size_t(kTileW) * C * sizeof(float);
  auto kernel = dwconv_ln_fwd_kernel<scalar_t, K>;
  request_shared_memory(kernel, smem, 0, "dwconv_ln", C);
  const dim3 grid((W + kTileW - 1) / kTileW, H, N);
  kernel<<<grid, threads, smem, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<scalar_t>(), w_taps.data_ptr<float>(),
      b.defined() ? b.data_ptr<scalar_t>() : nullptr, lw.data_ptr<scalar_t>(),
      lb.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), mean.data_ptr<float>(),
      rstd.data_ptr<float>(), H, W, C, eps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_k(int k, const at::Tensor& x, const at::Tensor& w_taps, const at::Tensor& b,
              const at::Tensor& lw, const at::Tensor& lb, at::Tensor& y, at::Tensor& mean,
              at::Tensor& rstd, float eps) {
  switch (k) {
    case 3:
      return launch<scalar_t, 3>(x, w_taps, b, lw, lb, y, mean, rstd, eps);
    case 5:
      return launch<scalar_t, 5>(x, w_taps, b, lw, lb, y, mean, rstd, eps);
    case 7:
      return launch<scalar_t, 7>(x, w_taps, b, lw, lb, y, mean, rstd, eps);
    default:
      TORCH_CHECK(false, "dwconv_ln: the CUDA kernel supports k in {3, 5, 7}, got ", k);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_ln_cuda(
    const at::Tensor& x, const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps) {
  constexpr const char* op = "dwconv_ln";
  const int k = static_cast<int>(check_dwconv_ln(x, conv_weight, conv_bias, ln_weight, ln_bias));
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(k == 3 || k == 5 || k == 7, op, ": the CUDA kernel supports k in {3, 5, 7}, got ", k);
  TORCH_CHECK(C <= kMaxC, op, ": C = ", C, " exceeds the CUDA kernel's limit of ", kMaxC);
  TORCH_CHECK(N <= kMaxGridYZ && H <= kMaxGridYZ, op, ": N = ", N, " and H = ", H, " must be <= ",
              kMaxGridYZ, " (CUDA grid limits)");
  TORCH_CHECK(W * C <= INT32_MAX && H * W <= INT32_MAX && W <= INT32_MAX - kTileW, op,
              ": one image row or plane is too large");

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y, mean, rstd;
  std::tie(y, mean, rstd) = dwconv_ln_outputs(x);
  if (x.numel() == 0) return {y, mean, rstd};

  const auto w_taps = conv_weight.reshape({C, k * k}).t().to(at::kFloat).contiguous();
  const auto b = conv_bias.has_value() ? conv_bias->contiguous() : at::Tensor();
  const auto lw = ln_weight.contiguous(), lb = ln_bias.contiguous();
  const float e = static_cast<float>(eps);
  // fp64 is left to the reference backend: this kernel accumulates in fp32.
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_k<float>(k, x, w_taps, b, lw, lb, y, mean, rstd, e);
      break;
    case at::kHalf:
      launch_k<at::Half>(k, x, w_taps, b, lw, lb, y, mean, rstd, e);
      break;
    case at::kBFloat16:
      launch_k<at::BFloat16>(k, x, w_taps, b, lw, lb, y, mean, rstd, e);
      break;
    default:
      TORCH_CHECK(false, op, ": the CUDA kernel takes float32, float16 or bfloat16, got ",
                  x.scalar_type());
  }
  return {y, mean, rstd};
}

}  // namespace

TORCH_LIBRARY_IMPL(convnext_fast, CUDA, m) { m.impl("dwconv_ln", &dwconv_ln_cuda); }

}  // namespace convnext_fast

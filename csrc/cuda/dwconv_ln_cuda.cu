// dwconv_ln forward on CUDA: depthwise kxk conv ('same' padding, stride 1) + bias, then LayerNorm
// over C, for channels_last (NHWC) tensors.
//
// A block owns TILE_W consecutive pixels of one image row and all C channels:
//   1. conv: threads walk (pixel, channel) with channel fastest, so every tap's loads are
//      contiguous along C (coalesced); results go to shared memory as fp32 [TILE_W, C];
//   2. statistics: one warp per pixel, two passes over the shared row (mean, then centered
//      variance) with shuffle reductions, fp32;
//   3. normalise and store, again channel-fastest for coalesced stores.
// TILE_W shrinks as C grows so the fp32 tile fits in 48 KiB of shared memory (C up to 12288).
// This is the straightforward first version; the shared-memory halo tile and vector loads are
// the next step (issue 5).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <type_traits>

#include "../include/checks.h"

namespace convnext_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kSmemFloats = 48 * 1024 / sizeof(float);

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    dwconv_ln_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                         const scalar_t* __restrict__ bias, const scalar_t* __restrict__ ln_w,
                         const scalar_t* __restrict__ ln_b, scalar_t* __restrict__ y,
                         float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t H,
                         int64_t W, int64_t C, int k, int tile_w, float eps) {
  extern __shared__ float tile[];  // [tile_w, C]
  const int64_t n = blockIdx.z, h = blockIdx.y, w0 = int64_t(blockIdx.x) * tile_w;
  const int p = k / 2;
  const int64_t pixels = W - w0 < tile_w ? W - w0 : tile_w;

  for (int64_t i = threadIdx.x; i < pixels * C; i += kThreads) {
    const int64_t q = i / C, c = i % C, wq = w0 + q;
    float acc = bias != nullptr ? static_cast<float>(bias[c]) : 0.f;
    for (int kh = 0; kh < k; ++kh) {
      const int64_t ih = h + kh - p;
      if (ih < 0 || ih >= H) continue;
      const scalar_t* row = x + ((n * H + ih) * W) * C + c;
      for (int kw = 0; kw < k; ++kw) {
        const int64_t iw = wq + kw - p;
        if (iw < 0 || iw >= W) continue;
        acc += static_cast<float>(row[iw * C]) * static_cast<float>(w[(c * k + kh) * k + kw]);
      }
    }
    tile[q * C + c] = acc;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t q = warp; q < pixels; q += kWarps) {
    float* v = tile + q * C;
    float s = 0.f;
    for (int64_t c = lane; c < C; c += 32) s += v[c];
    const float mu = warp_sum(s) / C;
    float sq = 0.f;
    for (int64_t c = lane; c < C; c += 32) {
      const float d = v[c] - mu;
      sq += d * d;
    }
    const float rstd = rsqrtf(warp_sum(sq) / C + eps);
    // Every lane has read v before any lane overwrites it: the shuffles above synchronise the warp.
    for (int64_t c = lane; c < C; c += 32) v[c] = (v[c] - mu) * rstd;
    if (lane == 0) {
      const int64_t pix = (n * H + h) * W + w0 + q;
      mean_out[pix] = mu;
      rstd_out[pix] = rstd;
    }
  }
  __syncthreads();

  scalar_t* out = y + ((n * H + h) * W + w0) * C;
  for (int64_t i = threadIdx.x; i < pixels * C; i += kThreads) {
    const int64_t c = i % C;
    out[i] = static_cast<scalar_t>(tile[i] * static_cast<float>(ln_w[c]) +
                                   static_cast<float>(ln_b[c]));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_ln_cuda(
    const at::Tensor& x, const at::Tensor& conv_weight, const std::optional<at::Tensor>& conv_bias,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps) {
  constexpr const char* op = "dwconv_ln";
  CNF_CHECK_NHWC("dwconv_ln", "x", x);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(0) == C && conv_weight.size(1) == 1 &&
                  conv_weight.size(2) == conv_weight.size(3) && conv_weight.size(2) % 2 == 1,
              op, ": conv_weight must have shape [C, 1, k, k] = [", C,
              ", 1, k, k] with odd k, got ", conv_weight.sizes());
  CNF_CHECK_SAME("dwconv_ln", "conv_weight", conv_weight, x);
  if (conv_bias.has_value()) {
    CNF_CHECK_VEC("dwconv_ln", "conv_bias", (*conv_bias), x, C);
  }
  CNF_CHECK_VEC("dwconv_ln", "ln_weight", ln_weight, x, C);
  CNF_CHECK_VEC("dwconv_ln", "ln_bias", ln_bias, x, C);
  TORCH_CHECK(C <= kSmemFloats, op, ": C = ", C, " exceeds the CUDA kernel's limit of ",
              kSmemFloats, " channels");
  TORCH_CHECK(H <= 65535, op, ": H = ", H, " exceeds the CUDA grid limit of 65535 rows");
  TORCH_CHECK(N <= 65535, op, ": N = ", N, " exceeds the CUDA grid limit of 65535 images");
  const int k = static_cast<int>(conv_weight.size(2));

  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  auto stat_opts = x.options().dtype(at::kFloat);
  auto mean = at::empty({N, H, W}, stat_opts);
  auto rstd = at::empty({N, H, W}, stat_opts);
  if (poison_outputs()) {
    y.fill_(NAN);
    mean.fill_(NAN);
    rstd.fill_(NAN);
  }
  if (x.numel() == 0) return {y, mean, rstd};

  const auto w = conv_weight.contiguous();
  const auto b = conv_bias.has_value() ? conv_bias->contiguous() : at::Tensor();
  const auto lw = ln_weight.contiguous(), lb = ln_bias.contiguous();
  const int tile_w = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(32, kSmemFloats / C)));
  const dim3 grid(static_cast<unsigned>((W + tile_w - 1) / tile_w), static_cast<unsigned>(H),
                  static_cast<unsigned>(N));
  const size_t smem = size_t(tile_w) * C * sizeof(float);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto* x_ptr) {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(x_ptr)>>;
    dwconv_ln_fwd_kernel<scalar_t><<<grid, kThreads, smem, stream>>>(
        x_ptr, w.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
        lw.data_ptr<scalar_t>(), lb.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
        mean.data_ptr<float>(), rstd.data_ptr<float>(), H, W, C, k, tile_w,
        static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  // fp64 is left to the reference backend: this kernel accumulates in fp32.
  switch (x.scalar_type()) {
    case at::kFloat:
      launch(x.data_ptr<float>());
      break;
    case at::kHalf:
      launch(x.data_ptr<at::Half>());
      break;
    case at::kBFloat16:
      launch(x.data_ptr<at::BFloat16>());
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

// dwconv_ln backward on CUDA, from x and the forward's per-pixel fp32 mean/rstd; the conv output z
// is recomputed from x, never stored by the forward.
//
//   xhat = (z - mean) * rstd,  g = grad_y * ln_weight
//   dz   = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat))
//   d_ln_weight = sum_pix grad_y * xhat,  d_ln_bias = sum_pix grad_y,  d_conv_bias = sum_pix dz
//   d_conv_weight[c, kh, kw] = sum_pix dz[pix] * x[pix + (kh - p, kw - p)]
//   dx = dz convolved ('same', depthwise) with the flipped taps
//
// Five launches, all on the current stream:
//   1. dz_kernel: a block takes tiles of kTileW pixels of one image row and all C, striding over
//      the tiles in a fixed order. It recomputes z into shared memory exactly as the forward does,
//      one warp per pixel turns z into xhat (in place) and the two channel means, then a thread per
//      channel writes dz to an fp32 buffer and adds the tile to the block's partial d_conv_bias,
//      d_ln_weight, d_ln_bias (the block's own rows of a [blocks, 3, C] buffer).
//   2. dx_kernel: the forward's conv loop run on dz with flipped taps and no bias, stored to dx.
//   3. dw_kernel: a block owns 32 channels and a fixed set of image rows; thread (c, kh) slides along
//      each row and accumulates the k taps d_conv_weight[c, kh, :] in registers.
//   4. reduce_partials_kernel, twice: the block partials of 1 and 3 summed in a fixed order.
// Determinism: no atomics. The number of partial blocks and the order of every sum depend on the
// shape only, so the gradients are bitwise reproducible on one GPU model.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../include/dwconv_cuda.cuh"
#include "../include/dwconv_ln_bwd.h"

namespace convnext_fast {
namespace {

// About one full GPU of threads (132 SMs x 2048 on an H100): the grids that produce partial sums
// are capped near this, so the partials stay a few MiB whatever the batch.
constexpr int64_t kResidentThreads = int64_t(1) << 18;
// Channels per block of dw_kernel and reduce_partials_kernel (one warp along C).
constexpr int kChannelsPerBlock = 32;
// Partial blocks summed side by side by one reduce block before the fixed-order final sum.
constexpr int kReduceSlices = 16;

// part is [gridDim.x, 3, C]: the block's sums of dz, grad_y * xhat and grad_y per channel.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kMaxThreads)
    dwconv_ln_bwd_dz_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_y,
                            const float* __restrict__ w_taps, const scalar_t* __restrict__ bias,
                            const scalar_t* __restrict__ ln_w, const float* __restrict__ mean,
                            const float* __restrict__ rstd, float* __restrict__ dz,
                            float* __restrict__ part, int H, int W, int C, int64_t num_tiles) {
  extern __shared__ float tile[];  // [kTileW, C]: z, then xhat
  __shared__ float s_mean_g[kTileW], s_mean_gx[kTileW], s_rstd[kTileW];
  const int tiles_per_row = (W + kTileW - 1) / kTileW;
  const int64_t row_stride = int64_t(W) * C;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;

  // The block's partials live in its own rows of part, each element read and written only by the
  // thread that owns its channel: kept in registers for up to 8 channels a thread, they pushed the
  // kernel to 128 registers with spills.
  float* part_db = part + int64_t(blockIdx.x) * 3 * C;
  float* part_dlw = part_db + C;
  float* part_dlb = part_dlw + C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) part_db[c] = part_dlw[c] = part_dlb[c] = 0.f;

  for (int64_t t = blockIdx.x; t < num_tiles; t += gridDim.x) {
    const int64_t nh = t / tiles_per_row;  // image row: n * H + h
    const int h = static_cast<int>(nh % H);
    const int w0 = static_cast<int>(t % tiles_per_row) * kTileW;
    const int pixels = min(kTileW, W - w0);
    const int64_t pix0 = nh * W + w0;
    const scalar_t* x_img = x + (nh - h) * row_stride;

    // z, as in the forward: a thread per channel slides along the row, each input loaded once per
    // kernel row and fed to all k taps from registers.
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      float acc[kTileW];
      conv_row_tile<K, 1>(x_img, w_taps, h, w0, H, W, C, row_stride, c,
                          bias != nullptr ? static_cast<float>(bias[c]) : 0.f, acc);
#pragma unroll
      for (int q = 0; q < kTileW; ++q) {
        if (q < pixels) tile[q * C + c] = acc[q];
      }
    }
    __syncthreads();

    // Per pixel: xhat in place, and mean_C(g), mean_C(g * xhat) with the saved statistics. Each
    // lane rewrites only the elements it read itself.
    for (int q = warp; q < pixels; q += warps) {
      const float mu = mean[pix0 + q], r = rstd[pix0 + q];
      const scalar_t* gy = grad_y + (pix0 + q) * C;
      float* v = tile + q * C;
      float s_g = 0.f, s_gx = 0.f;
      for (int c = lane; c < C; c += 32) {
        const float xh = (v[c] - mu) * r;
        v[c] = xh;
        const float g = static_cast<float>(gy[c]) * static_cast<float>(ln_w[c]);
        s_g += g;
        s_gx = fmaf(g, xh, s_gx);
      }
      s_g = warp_sum(s_g);
      s_gx = warp_sum(s_gx);
      if (lane == 0) {
        s_mean_g[q] = s_g / C;
        s_mean_gx[q] = s_gx / C;
        s_rstd[q] = r;
      }
    }
    __syncthreads();

    // dz, coalesced along C, and the channel partials in a fixed pixel order.
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
      const float lw = static_cast<float>(ln_w[c]);
      float db = part_db[c], dlw = part_dlw[c], dlb = part_dlb[c];
      for (int q = 0; q < pixels; ++q) {
        const int64_t off = (pix0 + q) * C + c;
        const float xh = tile[q * C + c];
        const float gy = static_cast<float>(grad_y[off]);
        const float d = s_rstd[q] * (gy * lw - s_mean_g[q] - xh * s_mean_gx[q]);
        dz[off] = d;
        db += d;
        dlw = fmaf(gy, xh, dlw);
        dlb += gy;
      }
      part_db[c] = db;
      part_dlw[c] = dlw;
      part_dlb[c] = dlb;
    }
    __syncthreads();  // the next tile overwrites tile and the per-pixel means
  }
}

// dx = dz correlated with the flipped taps (w_flip[(kh * K + kw) * C + c] = w[c, K-1-kh, K-1-kw]):
// the output pixel that read x[h, w] through tap (kh, kw) is (h + P - kh, w + P - kw). One block per
// tile of kTileW pixels of a row, the forward's register sliding window, no shared memory.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kMaxThreads)
    dwconv_ln_bwd_dx_kernel(const float* __restrict__ dz, const float* __restrict__ w_flip,
                            scalar_t* __restrict__ dx, int H, int W, int C) {
  const int tiles_per_row = (W + kTileW - 1) / kTileW;
  const int64_t row_stride = int64_t(W) * C;
  const int64_t t = blockIdx.x;
  const int64_t nh = t / tiles_per_row;
  const int h = static_cast<int>(nh % H);
  const int w0 = static_cast<int>(t % tiles_per_row) * kTileW;
  const int pixels = min(kTileW, W - w0);
  const int64_t pix0 = nh * W + w0;
  const float* dz_img = dz + (nh - h) * row_stride;

  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    float acc[kTileW];
    conv_row_tile<K, 1>(dz_img, w_flip, h, w0, H, W, C, row_stride, c, 0.f, acc);
#pragma unroll
    for (int q = 0; q < kTileW; ++q) {
      if (q < pixels) dx[(pix0 + q) * C + c] = static_cast<scalar_t>(acc[q]);
    }
  }
}

// part is [gridDim.y, K * K, C]: block (cg, r) sums, for channels cg * 32 + threadIdx.x, the image
// rows nh = r, r + gridDim.y, ... Thread (c, kh) holds d_conv_weight[c, kh, 0..K) and slides along
// each row: dz of kTileW output pixels and the kTileW + K - 1 inputs of source row h + kh - P.
template <typename scalar_t, int K>
__global__ void __launch_bounds__(kChannelsPerBlock * K)
    dwconv_ln_bwd_dw_kernel(const scalar_t* __restrict__ x, const float* __restrict__ dz,
                            float* __restrict__ part, int64_t NH, int H, int W, int C) {
  constexpr int P = K / 2;
  const int c = blockIdx.x * kChannelsPerBlock + threadIdx.x;
  const int kh = threadIdx.y;
  if (c >= C) return;  // no barriers below
  const int64_t row_stride = int64_t(W) * C;
  float acc[K];
#pragma unroll
  for (int kw = 0; kw < K; ++kw) acc[kw] = 0.f;

  for (int64_t nh = blockIdx.y; nh < NH; nh += gridDim.y) {
    const int h = static_cast<int>(nh % H);
    const int ih = h + kh - P;
    if (ih < 0 || ih >= H) continue;  // padding: contributes zero
    const float* dz_row = dz + nh * row_stride + c;
    const scalar_t* x_row = x + (nh - h + ih) * row_stride + c;
    for (int w0 = 0; w0 < W; w0 += kTileW) {
      float d[kTileW];
#pragma unroll
      for (int q = 0; q < kTileW; ++q) d[q] = w0 + q < W ? dz_row[int64_t(w0 + q) * C] : 0.f;
#pragma unroll
      for (int j = 0; j < kTileW + K - 1; ++j) {
        const int iw = w0 + j - P;
        const float v = (iw >= 0 && iw < W) ? static_cast<float>(x_row[int64_t(iw) * C]) : 0.f;
#pragma unroll
        for (int kw = 0; kw < K; ++kw) {
          const int q = j - kw;  // output pixel w0 + q read input column w0 + j through tap kw
          if (q >= 0 && q < kTileW) acc[kw] = fmaf(d[q], v, acc[kw]);
        }
      }
    }
  }

  float* out = part + (int64_t(blockIdx.y) * K * K + kh * K) * C + c;
#pragma unroll
  for (int kw = 0; kw < K; ++kw) out[int64_t(kw) * C] = acc[kw];
}

// out[r * C + c] = sum over g in [0, G) of part[(g * rows + r) * C + c], r = blockIdx.y. Slice s of
// the block sums g = s, s + kReduceSlices, ..., then slice 0 adds the slices in order: a fixed order.
__global__ void __launch_bounds__(kChannelsPerBlock * kReduceSlices)
    reduce_partials_kernel(const float* __restrict__ part, float* __restrict__ out, int G, int rows,
                           int C) {
  __shared__ float sums[kReduceSlices][kChannelsPerBlock];
  const int c = blockIdx.x * kChannelsPerBlock + threadIdx.x;
  const int r = blockIdx.y;
  float s = 0.f;
  if (c < C) {
    for (int g = threadIdx.y; g < G; g += kReduceSlices) s += part[(int64_t(g) * rows + r) * C + c];
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kReduceSlices; ++i) total += sums[i][threadIdx.x];
    out[int64_t(r) * C + c] = total;
  }
}

// grads: fp32 [K * K + 3, C]: rows 0..K*K-1 the conv weight taps (kh * K + kw), then d_conv_bias,
// d_ln_weight, d_ln_bias.
template <typename scalar_t, int K>
void launch(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_taps,
            const at::Tensor& w_flip, const at::Tensor& b, const at::Tensor& lw,
            const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& grads) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  const int C = static_cast<int>(x.size(1));
  const int64_t NH = N * H;
  const int64_t tiles = NH * ((W + kTileW - 1) / kTileW);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);
  const int threads = std::min(kMaxThreads, std::max(64, (C + 31) / 32 * 32));

  // 1. dz and the partial sums of d_conv_bias, d_ln_weight, d_ln_bias.
  const int blocks_dz =
      static_cast<int>(std::min<int64_t>(tiles, std::max<int64_t>(1, kResidentThreads / threads)));
  const size_t smem = size_t(kTileW) * C * sizeof(float);
  // Uninitialised: kernel 1 writes every element before kernels 2 and 3 read it.
  at::Tensor dz = at::empty({NH * W * C}, f32);
  at::Tensor part_ln = at::empty({blocks_dz, 3, C}, f32);
  auto dz_kernel = dwconv_ln_bwd_dz_kernel<scalar_t, K>;
  // The kernel's static per-pixel statistics (3 x kTileW floats) count against the limits too
  // (C = 1536 is exactly 48 KiB of tile).
  request_shared_memory(dz_kernel, smem, kBwdStaticSharedBytes, "dwconv_ln_bwd", C);
  dz_kernel<<<blocks_dz, threads, smem, stream>>>(
      x.data_ptr<scalar_t>(), grad_y.data_ptr<scalar_t>(), w_taps.data_ptr<float>(),
      b.defined() ? b.data_ptr<scalar_t>() : nullptr, lw.data_ptr<scalar_t>(),
      mean.data_ptr<float>(), rstd.data_ptr<float>(), dz.data_ptr<float>(),
      part_ln.data_ptr<float>(), static_cast<int>(H), static_cast<int>(W), C, tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 2. dx.
  dwconv_ln_bwd_dx_kernel<scalar_t, K><<<static_cast<unsigned>(tiles), threads, 0, stream>>>(
      dz.data_ptr<float>(), w_flip.data_ptr<float>(), dx.data_ptr<scalar_t>(),
      static_cast<int>(H), static_cast<int>(W), C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 3. partial sums of d_conv_weight.
  const int channel_blocks = (C + kChannelsPerBlock - 1) / kChannelsPerBlock;
  const int row_blocks = static_cast<int>(std::min<int64_t>(
      NH, std::max<int64_t>(1, kResidentThreads / (kChannelsPerBlock * K) / channel_blocks)));
  at::Tensor part_dw = at::empty({row_blocks, K * K, C}, f32);
  dwconv_ln_bwd_dw_kernel<scalar_t, K>
      <<<dim3(channel_blocks, row_blocks), dim3(kChannelsPerBlock, K), 0, stream>>>(
          x.data_ptr<scalar_t>(), dz.data_ptr<float>(), part_dw.data_ptr<float>(), NH,
          static_cast<int>(H), static_cast<int>(W), C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // 4. the fixed-order reductions of both sets of partials.
  const dim3 reduce_threads(kChannelsPerBlock, kReduceSlices);
  reduce_partials_kernel<<<dim3(channel_blocks, K * K), reduce_threads, 0, stream>>>(
      part_dw.data_ptr<float>(), grads.data_ptr<float>(), row_blocks, K * K, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reduce_partials_kernel<<<dim3(channel_blocks, 3), reduce_threads, 0, stream>>>(
      part_ln.data_ptr<float>(), grads.data_ptr<float>() + int64_t(K) * K * C, blocks_dz, 3, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_k(int k, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w_taps,
              const at::Tensor& w_flip, const at::Tensor& b, const at::Tensor& lw,
              const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& grads) {
  switch (k) {
    case 3:
      return launch<scalar_t, 3>(grad_y, x, w_taps, w_flip, b, lw, mean, rstd, dx, grads);
    case 5:
      return launch<scalar_t, 5>(grad_y, x, w_taps, w_flip, b, lw, mean, rstd, dx, grads);
    case 7:
      return launch<scalar_t, 7>(grad_y, x, w_taps, w_flip, b, lw, mean, rstd, dx, grads);
    default:
      TORCH_CHECK(false, "dwconv_ln_bwd: the CUDA kernel supports k in {3, 5, 7}, got ", k);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_ln_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& conv_weight,
    const std::optional<at::Tensor>& conv_bias, const at::Tensor& ln_weight,
    const at::Tensor& mean, const at::Tensor& rstd) {
  constexpr const char* op = "dwconv_ln_bwd";
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs may require grad
  const int64_t k = check_dwconv_ln_bwd(grad_y, x, conv_weight, conv_bias, ln_weight, mean, rstd);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(x.is_cuda(), op, ": the CUDA kernel needs CUDA tensors, x is on ", x.device());
  TORCH_CHECK(k == 3 || k == 5 || k == 7, op, ": the CUDA kernel supports k in {3, 5, 7}, got ", k);
  TORCH_CHECK(C <= kMaxC, op, ": C = ", C, " exceeds the CUDA kernel's limit of ", kMaxC);
  TORCH_CHECK(H <= INT32_MAX && W <= INT32_MAX - kTileW &&
                  N * H * ((W + kTileW - 1) / kTileW) <= INT32_MAX,
              op, ": x of shape ", x.sizes(), " has too many pixels for the CUDA kernel's grid");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              op, ": the CUDA kernel takes float32, float16 or bfloat16, got ", x.scalar_type());

  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor dx, dw, db, dlw, dlb;
  std::tie(dx, dw, db, dlw, dlb) = dwconv_ln_bwd_outputs(x, conv_weight, conv_bias, ln_weight);
  if (x.numel() == 0) {
    for (at::Tensor* t : {&dw, &db, &dlw, &dlb}) t->zero_();
    return {dx, dw, db, dlw, dlb};
  }

  // Taps as [k*k, C] fp32 (coalesced weight loads along C), and the same flipped for dx.
  const at::Tensor w2d = conv_weight.reshape({C, k, k}).to(at::kFloat);
  const at::Tensor w_taps = w2d.reshape({C, k * k}).t().contiguous();
  const at::Tensor w_flip = w2d.flip({1, 2}).reshape({C, k * k}).t().contiguous();
  const at::Tensor b = conv_bias.has_value() ? conv_bias->contiguous() : at::Tensor();
  const at::Tensor lw = ln_weight.contiguous();
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor grads = at::empty({k * k + 3, C}, x.options().dtype(at::kFloat));
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_k<float>(static_cast<int>(k), grad_y, x, w_taps, w_flip, b, lw, mc, rc, dx, grads);
      break;
    case at::kHalf:
      launch_k<at::Half>(static_cast<int>(k), grad_y, x, w_taps, w_flip, b, lw, mc, rc, dx, grads);
      break;
    default:
      launch_k<at::BFloat16>(static_cast<int>(k), grad_y, x, w_taps, w_flip, b, lw, mc, rc, dx,
                             grads);
      break;
  }
  dw.copy_(grads.narrow(0, 0, k * k).t().reshape({C, 1, k, k}));
  db.copy_(grads[k * k]);
  dlw.copy_(grads[k * k + 1]);
  dlb.copy_(grads[k * k + 2]);
  return {dx, dw, db, dlw, dlb};
}

}  // namespace

TORCH_LIBRARY_IMPL(convnext_fast, CUDA, m) { m.impl("dwconv_ln_bwd", &dwconv_ln_bwd_cuda); }

}  // namespace convnext_fast

// dwconv_ln forward on CUDA: depthwise kxk conv ('same' padding, stride 1) + bias, then LayerNorm
// over C, for channels_last (NHWC) tensors. The kernel is dwconv_ln_tile_kernel (dwconv_cuda.cuh:
// the tile, the rolling window of input rows, the thread ownership); this file chooses its tiling
// and instance and launches it.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "../include/dwconv_cuda.cuh"
#include "../include/dwconv_ln.h"

namespace convnext_fast {
namespace {

template <typename T, int K, int NCV, bool kStaged>
void launch_tiling(const LnArgs<T>& args, const LnTiling& t, int64_t N) {
  auto kernel = dwconv_ln_tile_kernel<T, K, NCV, kStaged, false>;
  request_shared_memory(kernel, t.smem, "dwconv_ln", args.C);
  const dim3 grid(t.tiles_w * t.bands, static_cast<unsigned>(N));
  kernel<<<grid, t.threads, t.smem, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The instances: a staged window when the tiling has one (then one vector a thread), else direct
// loads with 1 .. 4 vectors a thread.
template <typename T, int K>
void launch(const LnArgs<T>& args, const LnTiling& t, int64_t N) {
  if (t.staged) return launch_tiling<T, K, 1, true>(args, t, N);
  switch (t.ncv) {
    case 1:
      return launch_tiling<T, K, 1, false>(args, t, N);
    case 2:
      return launch_tiling<T, K, 2, false>(args, t, N);
    case 3:
      return launch_tiling<T, K, 3, false>(args, t, N);
    default:
      return launch_tiling<T, K, 4, false>(args, t, N);
  }
}

template <typename T>
void launch_k(int k, const at::Tensor& x, const at::Tensor& prm, at::Tensor& y, at::Tensor& mean,
              at::Tensor& rstd, float eps) {
  const int64_t N = x.size(0);
  const int C = x.size(1), H = x.size(2), W = x.size(3);
  const LnTiling t = ln_tiling(k, C, H, W, sizeof(T), false);
  LnArgs<T> args{};
  args.x = x.data_ptr<T>();
  args.prm = prm.data_ptr<float>();
  args.out = y.data_ptr<T>();
  args.mean = mean.data_ptr<float>();
  args.rstd = rstd.data_ptr<float>();
  args.H = H, args.W = W, args.C = C, args.cp = t.cv * kVec, args.groups = t.groups;
  args.q = t.q, args.r = t.r, args.band = t.band, args.tiles_w = t.tiles_w;
  args.eps = eps;
  // Whole-vector global accesses need C a multiple of kVec and vector-aligned tensors.
  const auto aligned = [](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % (kVec * sizeof(T)) == 0;
  };
  args.vec = C % kVec == 0 && aligned(args.x) && aligned(args.out);
  switch (k) {
    case 3:
      return launch<T, 3>(args, t, N);
    case 5:
      return launch<T, 5>(args, t, N);
    case 7:
      return launch<T, 7>(args, t, N);
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

  // fp32 parameters padded to whole channel vectors: taps [k * k, cp], conv bias, ln weight, bias.
  const int64_t cp = (C + kVec - 1) / kVec * kVec;
  at::Tensor prm = at::zeros({k * k + 3, cp}, x.options().dtype(at::kFloat));
  prm.narrow(0, 0, k * k).narrow(1, 0, C).copy_(conv_weight.reshape({C, k * k}).t());
  if (conv_bias.has_value()) prm[k * k].narrow(0, 0, C).copy_(*conv_bias);
  prm[k * k + 1].narrow(0, 0, C).copy_(ln_weight);
  prm[k * k + 2].narrow(0, 0, C).copy_(ln_bias);
  const float e = static_cast<float>(eps);
  // fp64 is left to the reference backend: this kernel accumulates in fp32.
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_k<float>(k, x, prm, y, mean, rstd, e);
      break;
    case at::kHalf:
      launch_k<at::Half>(k, x, prm, y, mean, rstd, e);
      break;
    case at::kBFloat16:
      launch_k<at::BFloat16>(k, x, prm, y, mean, rstd, e);
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

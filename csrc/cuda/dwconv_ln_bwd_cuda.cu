// dwconv_ln backward on CUDA, from x and the forward's per-pixel fp32 mean/rstd; the conv output z
// is recomputed from x, never stored by the forward.
//
//   xhat = (z - mean) * rstd,  g = grad_y * ln_weight
//   dz   = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat))
//   d_ln_weight = sum_pix grad_y * xhat,  d_ln_bias = sum_pix grad_y,  d_conv_bias = sum_pix dz
//   d_conv_weight[c, kh, kw] = sum_pix dz[pix] * x[pix + (kh - P, kw - P)]
//   dx = dz correlated ('same', depthwise) with the flipped taps
//
// Three kernels and two reductions, on the current stream:
//   K1 dwconv_ln_tile_kernel<kBwd = true> (dwconv_cuda.cuh): the forward's tiling; recomputes z,
//      writes dz in x's dtype, and one row per block of [tiles, 3, cp] partials of d_conv_bias
//      (from the fp32 dz), d_ln_weight and d_ln_bias.
//   K2 dwconv_ln_bwd_dx_dw_kernel: rolling windows of dz and x (a channel chunk a block, no
//      LayerNorm), dx from the dz window with the flipped taps, and the block's d_conv_weight in
//      registers, one row per block of [tiles, K * K, cp] partials.
//   reduce_partials_kernel, once per partial buffer.
// Determinism: no atomics. Every partial is a sum in a fixed order over a block's tile, and the
// tiles and the reduction order are functions of (N, C, H, W, k, dtype) only (the tilings never
// read the GPU's properties: kSharedBudget), so the gradients are bitwise reproducible for a shape,
// on any number of SMs, for a given build (the same SASS; sm_80 and sm_90 code may round alike but
// that is not promised).
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

// Channels of a reduce block (one warp along C) and partial rows it sums side by side before the
// fixed-order final sum.
constexpr int kReduceChannels = 32;
constexpr int kReduceSlices = 16;

template <typename T>
struct DxArgs {
  const T* x;
  const T* dz;
  const float* taps_flip;  // [K * K, cp]: w[c, K - 1 - kh, K - 1 - kw] at row kh * K + kw
  T* dx;
  float* part;  // [tiles, K * K, cp]
  int H, W, C, cp, gc, q, r, band, tiles_w;
  bool vec;
};

// K2. A block owns image n, a band, a column tile of q * kPx pixels and channel vectors
// chunk * gc .. (chunk + 1) * gc, with windows of S = K + r - 1 rows of dz and of x (both staged as
// in the forward, zeros outside the image). Per step of r rows:
//   dx: thread t < r * q * gc owns the strip (rr, qq, g) and runs the forward's conv on the dz
//       window with the flipped taps: dx[h, w] = sum dz[h + kh - P, w + kw - P] * w_flip[kh, kw].
//   dW: thread t < K * gc owns kernel row kh = t / gc of vector g = t % gc and adds, for each row h
//       of the step and pixel strip, dz[h, w] * x[h + kh - P, w + kw - P] for the K taps kw in
//       registers (dz from the window's centre columns, x from the window row h + kh - P).
// At the end the dW registers are the block's partial: part[tile, kh * K + kw, c].
template <typename T, int K>
__global__ void __launch_bounds__(kMaxThreads) dwconv_ln_bwd_dx_dw_kernel(const DxArgs<T> a) {
  constexpr int P = K / 2;
  using raw = typename Vec<T>::raw;
  extern __shared__ float4 smem[];
  const int H = a.H, W = a.W, C = a.C, cp = a.cp, gc = a.gc, q = a.q, r = a.r;
  const int TW = q * kPx, S = K + r - 1, cols = TW + K - 1, chans = gc * kVec;
  const int tw = blockIdx.x % a.tiles_w, band = blockIdx.x / a.tiles_w;
  const int64_t n = blockIdx.y;
  const int c_begin = blockIdx.z * chans;
  const int w0 = tw * TW, h0 = band * a.band, h_end = min(h0 + a.band, H);
  const int slot_elems = cols * chans;
  T* win_dz = reinterpret_cast<T*>(smem);
  T* win_x = win_dz + align16(size_t(S) * slot_elems * sizeof(T)) / sizeof(T);
  const int64_t img = n * H * int64_t(W) * C;

  const int t = threadIdx.x;
  const int rr = t / (q * gc), qq = (t / gc) % q, g = t % gc;
  const int c0 = c_begin + g * kVec;
  const int nv = t < r * q * gc ? max(0, min(kVec, C - c0)) : 0;
  const int kh_w = t / gc;
  const int nw = t < K * gc ? max(0, min(kVec, C - c0)) : 0;

  float4 dw[K];
#pragma unroll
  for (int kw = 0; kw < K; ++kw) dw[kw] = make_float4(0.f, 0.f, 0.f, 0.f);

  int next_row = h0 - P;
  for (int hs = h0; hs < h_end; hs += r) {
    const int last = min(hs + r, h_end) - 1 + P;
    for (; next_row <= last; ++next_row) {
      const int slot = (next_row - h0 + P) % S;
      stage_row(win_dz + slot * slot_elems, a.dz + img, next_row, w0 - P, cols, c_begin, chans, C,
                H, W, a.vec);
      stage_row(win_x + slot * slot_elems, a.x + img, next_row, w0 - P, cols, c_begin, chans, C, H,
                W, a.vec);
    }
    __syncthreads();

    const int h = hs + rr;
    if (nv > 0 && h < h_end) {
      float4 acc[kPx];
#pragma unroll
      for (int p = 0; p < kPx; ++p) acc[p] = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 1
      for (int kh = 0; kh < K; ++kh) {
        const T* base = win_dz + ((h + kh - h0) % S) * slot_elems + qq * kPx * chans + g * kVec;
        conv_row<T, K, true>(acc, base, chans, 0, W, nv, true, a.taps_flip + kh * K * cp + c0, cp);
      }
#pragma unroll
      for (int p = 0; p < kPx; ++p) {
        const int w = w0 + qq * kPx + p;
        if (w < W) store_vec(a.dx + img + (int64_t(h) * W + w) * C + c0, acc[p], nv, a.vec);
      }
    }

    if (nw > 0) {
#pragma unroll 1
      for (int hh = hs; hh < min(hs + r, h_end); ++hh) {
        const int ih = hh + kh_w - P;
        if (ih < 0 || ih >= H) continue;
        const T* dz_row = win_dz + ((hh - h0 + P) % S) * slot_elems + P * chans + g * kVec;
        const T* x_row = win_x + ((ih - h0 + P) % S) * slot_elems + g * kVec;
#pragma unroll 1
        for (int s = 0; s < q; ++s) {
          float4 d[kPx];
#pragma unroll
          for (int p = 0; p < kPx; ++p) {
            d[p] = Vec<T>::to_f32(*reinterpret_cast<const raw*>(dz_row + (s * kPx + p) * chans));
          }
#pragma unroll
          for (int j = 0; j < kPx + K - 1; ++j) {
            const float4 v =
                Vec<T>::to_f32(*reinterpret_cast<const raw*>(x_row + (s * kPx + j) * chans));
#pragma unroll
            for (int kw = 0; kw < K; ++kw) {
              const int p = j - kw;  // dz pixel s * kPx + p meets this x column through tap kw
              if (p >= 0 && p < kPx) fma4(dw[kw], d[p], v);
            }
          }
        }
      }
    }
    __syncthreads();  // the next step's staging overwrites the oldest window rows
  }

  if (nw > 0) {
    float* out = a.part + ((n * gridDim.x + blockIdx.x) * K * K + kh_w * K) * cp + c0;
#pragma unroll
    for (int kw = 0; kw < K; ++kw) *reinterpret_cast<float4*>(out + kw * cp) = dw[kw];
  }
}

// out[row * cp + c] = sum over tiles i of part[(i * rows + row) * cp + c], row = blockIdx.y. Slice
// s of the block sums i = s, s + kReduceSlices, ..., then slice 0 adds the slices in order.
__global__ void __launch_bounds__(kReduceChannels * kReduceSlices)
    reduce_partials_kernel(const float* __restrict__ part, float* __restrict__ out, int64_t tiles,
                           int rows, int cp) {
  __shared__ float sums[kReduceSlices][kReduceChannels];
  const int c = blockIdx.x * kReduceChannels + threadIdx.x;
  const int row = blockIdx.y;
  float s = 0.f;
  if (c < cp) {
    for (int64_t i = threadIdx.y; i < tiles; i += kReduceSlices) s += part[(i * rows + row) * cp + c];
  }
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cp) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kReduceSlices; ++i) total += sums[i][threadIdx.x];
    out[int64_t(row) * cp + c] = total;
  }
}

void reduce_partials(const at::Tensor& part, float* out, int rows, int cp, cudaStream_t stream) {
  const dim3 grid((cp + kReduceChannels - 1) / kReduceChannels, rows);
  reduce_partials_kernel<<<grid, dim3(kReduceChannels, kReduceSlices), 0, stream>>>(
      part.data_ptr<float>(), out, part.size(0), rows, cp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int K, int NCV, bool kStaged>
void launch_k1(const LnArgs<T>& args, const LnTiling& t, int64_t N, cudaStream_t stream) {
  auto kernel = dwconv_ln_tile_kernel<T, K, NCV, kStaged, true>;
  request_shared_memory(kernel, t.smem, "dwconv_ln_bwd", args.C);
  kernel<<<dim3(t.tiles_w * t.bands, static_cast<unsigned>(N)), t.threads, t.smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// prm: fp32 [2 * K * K + 3, cp]: taps, conv bias, ln_weight, (unused) ln_bias, flipped taps.
// grads: fp32 [K * K + 3, cp]: the taps' gradients (row kh * K + kw), then d_conv_bias,
// d_ln_weight, d_ln_bias.
template <typename T, int K>
void launch(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& prm,
            const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& grads) {
  const int64_t N = x.size(0);
  const int C = x.size(1), H = x.size(2), W = x.size(3);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);
  const auto aligned = [](const void* p) {
    return reinterpret_cast<uintptr_t>(p) % (kVec * sizeof(T)) == 0;
  };
  // Uninitialised: K1 writes every element of dz and of its partials, K2 every element of its
  // partials, before anything reads them.
  at::Tensor dz = at::empty_like(x, at::MemoryFormat::ChannelsLast);

  const LnTiling t1 = ln_tiling(K, C, H, W, sizeof(T), true);
  const int cp = t1.cv * kVec;
  at::Tensor part_ln = at::empty({N * t1.tiles_w * t1.bands, 3, cp}, f32);
  LnArgs<T> a1{};
  a1.x = x.data_ptr<T>();
  a1.prm = prm.data_ptr<float>();
  a1.out = dz.data_ptr<T>();
  a1.mean = mean.data_ptr<float>();
  a1.rstd = rstd.data_ptr<float>();
  a1.grad_y = grad_y.data_ptr<T>();
  a1.part = part_ln.data_ptr<float>();
  a1.H = H, a1.W = W, a1.C = C, a1.cp = cp, a1.groups = t1.groups;
  a1.q = t1.q, a1.r = t1.r, a1.band = t1.band, a1.tiles_w = t1.tiles_w;
  a1.vec = C % kVec == 0 && aligned(a1.x) && aligned(a1.out) && aligned(a1.grad_y);
  if (t1.staged) {
    launch_k1<T, K, 1, true>(a1, t1, N, stream);
  } else if (t1.ncv == 1) {
    launch_k1<T, K, 1, false>(a1, t1, N, stream);
  } else if (t1.ncv == 2) {
    launch_k1<T, K, 2, false>(a1, t1, N, stream);
  } else if (t1.ncv == 3) {
    launch_k1<T, K, 3, false>(a1, t1, N, stream);
  } else {
    launch_k1<T, K, 4, false>(a1, t1, N, stream);
  }

  const DxTiling t2 = dx_tiling(K, C, H, W, sizeof(T));
  at::Tensor part_dw = at::empty({N * t2.tiles_w * t2.bands, K * K, cp}, f32);
  DxArgs<T> a2{};
  a2.x = x.data_ptr<T>();
  a2.dz = dz.data_ptr<T>();
  a2.taps_flip = prm.data_ptr<float>() + int64_t(K * K + 3) * cp;
  a2.dx = dx.data_ptr<T>();
  a2.part = part_dw.data_ptr<float>();
  a2.H = H, a2.W = W, a2.C = C, a2.cp = cp, a2.gc = t2.gc;
  a2.q = t2.q, a2.r = t2.r, a2.band = t2.band, a2.tiles_w = t2.tiles_w;
  a2.vec = C % kVec == 0 && aligned(a2.x) && aligned(a2.dz) && aligned(a2.dx);
  auto k2 = dwconv_ln_bwd_dx_dw_kernel<T, K>;
  request_shared_memory(k2, t2.smem, "dwconv_ln_bwd", C);
  const dim3 grid2(t2.tiles_w * t2.bands, static_cast<unsigned>(N), t2.chunks);
  k2<<<grid2, t2.threads, t2.smem, stream>>>(a2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  reduce_partials(part_dw, grads.data_ptr<float>(), K * K, cp, stream);
  reduce_partials(part_ln, grads.data_ptr<float>() + int64_t(K) * K * cp, 3, cp, stream);
}

template <typename T>
void launch_k(int k, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& prm,
              const at::Tensor& mean, const at::Tensor& rstd, at::Tensor& dx, at::Tensor& grads) {
  switch (k) {
    case 3:
      return launch<T, 3>(grad_y, x, prm, mean, rstd, dx, grads);
    case 5:
      return launch<T, 5>(grad_y, x, prm, mean, rstd, dx, grads);
    case 7:
      return launch<T, 7>(grad_y, x, prm, mean, rstd, dx, grads);
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
  TORCH_CHECK(N <= kMaxGridYZ && H <= kMaxGridYZ, op, ": N = ", N, " and H = ", H, " must be <= ",
              kMaxGridYZ, " (CUDA grid limits)");
  TORCH_CHECK(W * C <= INT32_MAX && H * W <= INT32_MAX && W <= INT32_MAX - kTileW, op,
              ": one image row or plane is too large");
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

  // fp32 parameters padded to whole channel vectors (see launch).
  const int64_t cp = (C + kVec - 1) / kVec * kVec, kk = k * k;
  const at::Tensor w2d = conv_weight.reshape({C, k, k});
  at::Tensor prm = at::zeros({2 * kk + 3, cp}, x.options().dtype(at::kFloat));
  prm.narrow(0, 0, kk).narrow(1, 0, C).copy_(w2d.reshape({C, kk}).t());
  if (conv_bias.has_value()) prm[kk].narrow(0, 0, C).copy_(*conv_bias);
  prm[kk + 1].narrow(0, 0, C).copy_(ln_weight);
  prm.narrow(0, kk + 3, kk).narrow(1, 0, C).copy_(w2d.flip({1, 2}).reshape({C, kk}).t());
  const at::Tensor mc = mean.contiguous(), rc = rstd.contiguous();
  at::Tensor grads = at::empty({kk + 3, cp}, x.options().dtype(at::kFloat));
  switch (x.scalar_type()) {
    case at::kFloat:
      launch_k<float>(static_cast<int>(k), grad_y, x, prm, mc, rc, dx, grads);
      break;
    case at::kHalf:
      launch_k<at::Half>(static_cast<int>(k), grad_y, x, prm, mc, rc, dx, grads);
      break;
    default:
      launch_k<at::BFloat16>(static_cast<int>(k), grad_y, x, prm, mc, rc, dx, grads);
      break;
  }
  const at::Tensor g = grads.narrow(1, 0, C);
  dw.copy_(g.narrow(0, 0, kk).t().reshape({C, 1, k, k}));
  db.copy_(g[kk]);
  dlw.copy_(g[kk + 1]);
  dlb.copy_(g[kk + 2]);
  return {dx, dw, db, dlw, dlb};
}

}  // namespace

TORCH_LIBRARY_IMPL(convnext_fast, CUDA, m) { m.impl("dwconv_ln_bwd", &dwconv_ln_bwd_cuda); }

}  // namespace convnext_fast

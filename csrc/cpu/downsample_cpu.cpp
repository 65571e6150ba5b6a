// The ConvNeXt downsample for inference on the CPU: LayerNorm over C of every pixel, then the
// s x s conv of stride s (ConvNeXt's 2 x 2 / 2 between stages), as one GEMM on the mlp tiles'
// microkernel (include/mlp_tiles.h). The patches do not overlap, so A [M, s * s * C] holds each
// output pixel's s * s input pixels, normalised, in (kh, kw, c) order: the same bytes as x in
// another order, each input pixel normalised once. B is the conv weight in that order, packed
// into the tiles' panels once per weight version (derived_cache.h).
//
// Why not oneDNN's conv on the normalised tensor (models/cpu_conv.py, its weight packed once):
// at ConvNeXt-T's shapes it reached ~130 GF/s in fp32 on 2 Zen 4 threads, and the LayerNorm before
// it is a pass of its own over x (PyTorch's, ~10 GB/s on a 1.2 MB tensor).
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>

#include "../include/checks.h"
#include "../include/cpu_vec.h"
#include "../include/derived_cache.h"
#include "../include/downsample_cpu.h"
#include "../include/mlp_cpu.h"
#include "../include/mlp_tiles.h"

namespace convnext_fast {

bool downsample_cpu_supported(at::ScalarType st) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return st == at::kFloat || (st == at::kBFloat16 && cpu::tiles_bf16_supported());
#else
  (void)st;
  return false;
#endif
}

namespace {

// Tags of the derived-cache entries made here (mlp_cpu.cpp uses 1100-1102).
constexpr int64_t kPatchPanelsTag = 1103, kPatchPanelsBf16Tag = 1104;

// conv_weight [Cout, C, s, s] as B [(kh, kw, c), Cout] in the tiles' panels (bf16 pairs for a
// bf16 weight), once per version.
at::Tensor packed_patch_weight(const at::Tensor& w) {
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  return derived_cache().get(w, bf16 ? kPatchPanelsBf16Tag : kPatchPanelsTag, [bf16](const at::Tensor& t) {
    const at::Tensor flat = t.detach().permute({0, 2, 3, 1}).reshape({t.size(0), -1}).contiguous();
    const int64_t N = flat.size(0), K = flat.size(1);
    at::Tensor out = at::empty({K * cpu::padded_cols(N)}, flat.options());
    if (bf16) {
      cpu::pack_panels_bf16(flat.data_ptr<at::BFloat16>(), N, K, out.data_ptr<at::BFloat16>());
    } else {
      cpu::pack_panels(flat.data_ptr<float>(), N, K, out.data_ptr<float>());
    }
    return out;
  });
}

// a [M, s * s * C]: row m = output pixel (n, i, j), holding LayerNorm(x[n, i * s + kh, j * s + kw])
// at column (kh * s + kw) * C; statistics and affine in fp32, rounded once to scalar_t.
template <typename scalar_t>
void ln_patches(const scalar_t* x, const float* lw, const float* lb, double eps, int64_t N,
                int64_t C, int64_t H, int64_t W, int64_t s, scalar_t* a) {
  const int64_t Ho = H / s, Wo = W / s, K = s * s * C;
  at::parallel_for(0, N * Ho * Wo, 16, [&](int64_t m0, int64_t m1) {
    const cpu::ThreadScratch buf(C);
    float* v = buf.data();
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t n = m / (Ho * Wo), i = m / Wo % Ho, j = m % Wo;
      for (const auto kh : c10::irange(s)) {
        for (const auto kw : c10::irange(s)) {
          cpu::widen(x + ((n * H + i * s + kh) * W + j * s + kw) * C, v, C);
          const float mu = cpu::row_sum(v, C) / C;
          const float var = cpu::centered_sumsq(v, mu, C) / C;
          const float rstd = 1.f / std::sqrt(var + static_cast<float>(eps));
          cpu::normalize(v, mu, rstd, lw, lb, a + m * K + (kh * s + kw) * C, C);
        }
      }
    }
  });
}

at::Tensor downsample_cpu(const at::Tensor& x, const at::Tensor& ln_weight,
                          const at::Tensor& ln_bias, double eps, const at::Tensor& conv_weight,
                          const std::optional<at::Tensor>& conv_bias) {
  constexpr const char* op = "downsample";
  CNF_CHECK_NHWC("downsample", "x", x);
  const at::ScalarType st = x.scalar_type();
  TORCH_CHECK(downsample_cpu_supported(st), op, ": no CPU kernel for ", st,
              " in this build on this CPU (float32 needs an AVX2 or AVX-512 build, bfloat16 "
              "AVX512-BF16 without AMX)");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(conv_weight.dim() == 4 && conv_weight.size(1) == C &&
                  conv_weight.size(2) == conv_weight.size(3) && conv_weight.size(2) >= 1,
              op, ": conv_weight must be [C_out, ", C, ", s, s], got ", conv_weight.sizes());
  CNF_CHECK_SAME("downsample", "conv_weight", conv_weight, x);
  const int64_t Cout = conv_weight.size(0), s = conv_weight.size(2), K = s * s * C;
  TORCH_CHECK(ln_weight.dim() == 1 && ln_weight.size(0) == C && ln_bias.dim() == 1 &&
                  ln_bias.size(0) == C,
              op, ": ln_weight and ln_bias must be [", C, "], got ", ln_weight.sizes(), " and ",
              ln_bias.sizes());
  TORCH_CHECK(ln_weight.device() == x.device() && ln_bias.device() == x.device(), op,
              ": ln_weight and ln_bias must be on x's device");
  if (conv_bias.has_value()) {  // the macro is several statements
    CNF_CHECK_VEC("downsample", "conv_bias", *conv_bias, x, Cout);
  }
  TORCH_CHECK(H >= s && W >= s, "downsample: x's ", H, " x ", W, " pixels are fewer than the ", s,
              " x ", s, " kernel");
  TORCH_CHECK(st != at::kBFloat16 || K % 2 == 0, op,
              ": bfloat16 needs s * s * C even (the dot products take pairs), got ", K);

  at::Tensor out = at::empty({N, Cout, H / s, W / s}, x.options(), at::MemoryFormat::ChannelsLast);
  if (poison_outputs()) out.fill_(NAN);
  const int64_t M = N * (H / s) * (W / s);
  if (M == 0 || Cout == 0) return out;

  const at::Tensor lw = converted_weight(ln_weight, at::kFloat);
  const at::Tensor lb = converted_weight(ln_bias, at::kFloat);
  const at::Tensor packed = packed_patch_weight(conv_weight);
  const at::Tensor bias = padded_vector(conv_bias);
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  at::Tensor a = at::empty({M, K}, x.options());
  if (st == at::kBFloat16) {
    ln_patches(x.data_ptr<at::BFloat16>(), lw.data_ptr<float>(), lb.data_ptr<float>(), eps, N, C,
               H, W, s, a.data_ptr<at::BFloat16>());
    cpu::gemm_tiles_fwd_bf16(a.data_ptr<at::BFloat16>(), M, K, packed.data_ptr<at::BFloat16>(),
                             Cout, b, out.data_ptr<at::BFloat16>());
  } else {
    ln_patches(x.data_ptr<float>(), lw.data_ptr<float>(), lb.data_ptr<float>(), eps, N, C, H, W,
               s, a.data_ptr<float>());
    cpu::gemm_tiles_fwd(a.data_ptr<float>(), M, K, packed.data_ptr<float>(), Cout, b,
                        out.data_ptr<float>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(convnext_fast, CPU, m) { m.impl("downsample", &downsample_cpu); }

}  // namespace convnext_fast

// The bf16 block MLP on AVX512-BF16's dot products: the tiles of mlp_tiles.h (same panels of 4
// zmm columns, 6-row tiles, row or column splits) with vdpbf16ps in the microkernel, which
// multiplies pairs of bf16 along k and adds both products to an fp32 sum: twice the fp32 FMA's
// products per instruction. The weights are packed once per version with pairs of k interleaved
// ([K / 2][panel columns][2]); y, the hidden tile, the residual and the output are bf16, the
// sums and every epilogue (bias, GELU, gamma, residual add) fp32, so the hidden and the output
// are rounded once each, as in the onednn backend (PyTorch's bf16 Linear + GELU + scale + add
// rounds five times).
//
// Only this file's own functions are compiled for AVX512-BF16 (a target attribute): the rest of
// the extension, ATen's inline functions included, must run on AVX-512 CPUs without it, and
// tiles_bf16_supported() asks the CPU before anything here runs (and keeps AMX CPUs on oneDNN).
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#include "../include/mlp_tiles.h"

#if defined(CPU_CAPABILITY_AVX512) && defined(__x86_64__) && \
    (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 11))
#define CONVNEXT_FAST_TILES_BF16 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace convnext_fast {
namespace cpu {

void pack_panels_bf16(const c10::BFloat16* w, int64_t N, int64_t K, c10::BFloat16* dst) {
  TORCH_CHECK(K % 2 == 0, "pack_panels_bf16: K must be even, got ", K);
  const int64_t Np = padded_cols(N);
  for (int64_t j0 = 0; j0 < Np; j0 += kPanel) {
    const int64_t width = std::min(kPanel, Np - j0);
    c10::BFloat16* panel = dst + j0 * K;
    for (int64_t j = 0; j < width; ++j) {
      const int64_t n = j0 + j;
      for (int64_t k = 0; k < K; ++k) {
        panel[(k / 2) * width * 2 + j * 2 + k % 2] = n < N ? w[n * K + k] : c10::BFloat16(0.f);
      }
    }
  }
}

#ifdef CONVNEXT_FAST_TILES_BF16

#define CONVNEXT_FAST_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace {

constexpr int64_t L = Vec::size();
static_assert(L == 16, "the bf16 tiles are written for AVX-512's 16 fp32 lanes");

inline int32_t load_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Out of line (a caller without the target may not inline it): the sums go through memory once
// per call, against K / 2 * R * NV dot products inside. K is not cut into blocks: the fp32 sums'
// rounding (~sqrt(K / 2) ulps of fp32) is far below the bf16 output's, and the blocks' extra
// passes through memory cost 3-4% at K = 1536.
struct Bf16Mac {
  using E = uint16_t;
  static constexpr int64_t kSumBlock = int64_t{1} << 40;
  template <int R, int NV>
  CONVNEXT_FAST_BF16_TARGET __attribute__((noinline)) static void run(
      Vec (&acc)[R][NV], const uint16_t* a, int64_t lda, const uint16_t* panel, int64_t K) {
    __m512 s[R][NV];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) s[r][v] = acc[r][v];
    }
    for (int64_t k = 0; k < K; k += 2) {
      __m512bh b[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        b[v] = (__m512bh)_mm512_loadu_si512(panel + k * NV * L + v * 2 * L);
      }
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512bh x = (__m512bh)_mm512_set1_epi32(load_pair(a + r * lda + k));
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) s[r][v] = _mm512_dpbf16_ps(s[r][v], x, b[v]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec(s[r][v]);
    }
  }
};

CONVNEXT_FAST_BF16_TARGET inline __m256i to_bf16(__m512 x) {
  return (__m256i)_mm512_cvtneps_pbh(x);  // round to nearest even
}

CONVNEXT_FAST_BF16_TARGET inline __m512 from_bf16(__m256i x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

struct GeluStoreBf16 {
  uint16_t* h;
  int64_t ldh;
  template <int R, int NV>
  CONVNEXT_FAST_BF16_TARGET void operator()(Vec (&acc)[R][NV], int64_t row, int64_t col) const {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + (row + r) * ldh + col + v * L),
                            to_bf16(gelu_erf(acc[r][v])));
      }
    }
  }
};

struct ResidualStoreBf16 {
  uint16_t* out;
  const uint16_t* residual;  // may be null
  const float* gamma;        // may be null; padded to whole vectors
  int64_t ld, cols;          // row stride of out/residual; valid columns (C)
  template <int R, int NV>
  CONVNEXT_FAST_BF16_TARGET void operator()(Vec (&acc)[R][NV], int64_t row, int64_t col) const {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const int64_t c = col + v * L, off = (row + r) * ld + c, n = std::min<int64_t>(L, cols - c);
        if (n <= 0) break;
        const __mmask16 mask = n == L ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
        __m512 x = acc[r][v];
        if (gamma != nullptr) x = _mm512_mul_ps(x, _mm512_loadu_ps(gamma + c));
        if (residual != nullptr) {
          x = _mm512_add_ps(x, from_bf16(_mm256_maskz_loadu_epi16(mask, residual + off)));
        }
        _mm256_mask_storeu_epi16(out + off, mask, to_bf16(x));
      }
    }
  }
};

}  // namespace

// Where the CPU has AMX and the OS runs it, oneDNN's bf16 GEMMs (the ATen path) run on its
// tiles, several times the dot products' rate: the tiles here stay off there. CPUID leaf 7 EDX
// bit 22 is AMX-BF16; XCR0 bits 17-18 say the OS saves the tile state (without them oneDNN falls
// back to the dot products, and so do we, with the fused tiles).
bool amx_bf16_usable() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0 || (edx >> 22 & 1u) == 0) return false;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0 || (ecx >> 27 & 1u) == 0) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (lo >> 17 & 3u) == 3u;
}

bool tiles_bf16_supported() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") && !amx_bf16_usable();
  return ok;
}

void mlp_tiles_fwd_bf16(const c10::BFloat16* y, int64_t M, int64_t C, int64_t D,
                        const c10::BFloat16* w1p, const float* b1, const c10::BFloat16* w2p,
                        const float* b2, const float* gamma, const c10::BFloat16* residual,
                        c10::BFloat16* out) {
  TORCH_CHECK(tiles_bf16_supported(), "mlp_tiles_fwd_bf16: this CPU has no AVX512-BF16");
  TORCH_CHECK(C % 2 == 0 && D % 2 == 0, "mlp_tiles_fwd_bf16: C and D must be even, got ", C, ", ", D);
  const auto bits = [](const c10::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); };
  tiles_mlp<Bf16Mac, GeluStoreBf16, ResidualStoreBf16>(
      bits(y), M, C, D, bits(w1p), b1, bits(w2p), b2, gamma, bits(residual),
      reinterpret_cast<uint16_t*>(out));
}

void gemm_tiles_fwd_bf16(const c10::BFloat16* a, int64_t M, int64_t K, const c10::BFloat16* packed,
                         int64_t N, const float* bias, c10::BFloat16* out) {
  TORCH_CHECK(tiles_bf16_supported(), "gemm_tiles_fwd_bf16: this CPU has no AVX512-BF16");
  TORCH_CHECK(K % 2 == 0, "gemm_tiles_fwd_bf16: K must be even, got ", K);
  const auto* a16 = reinterpret_cast<const uint16_t*>(a);
  const auto* b16 = reinterpret_cast<const uint16_t*>(packed);
  auto* o16 = reinterpret_cast<uint16_t*>(out);
  split_gemm<uint16_t>(M, K, N, [&](int64_t r0, int64_t n, int64_t p0, int64_t p1) {
    gemm_panels<Bf16Mac>(a16 + r0 * K, K, b16, K, N, bias, n,
                         ResidualStoreBf16{o16 + r0 * N, nullptr, nullptr, N, N}, p0, p1);
  });
}

#else  // no AVX-512 build, or a compiler without the AVX512-BF16 intrinsics

bool tiles_bf16_supported() { return false; }

void mlp_tiles_fwd_bf16(const c10::BFloat16*, int64_t, int64_t, int64_t, const c10::BFloat16*,
                        const float*, const c10::BFloat16*, const float*, const float*,
                        const c10::BFloat16*, c10::BFloat16*) {
  TORCH_CHECK(false, "mlp_tiles_fwd_bf16: this build has no AVX512-BF16 tiles");
}

void gemm_tiles_fwd_bf16(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, int64_t,
                         const float*, c10::BFloat16*) {
  TORCH_CHECK(false, "gemm_tiles_fwd_bf16: this build has no AVX512-BF16 tiles");
}

#endif

}  // namespace cpu
}  // namespace convnext_fast

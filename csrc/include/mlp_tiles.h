// The block MLP for inference as register-tiled GEMMs on packed weights, fused over row tiles
// (fp32 here; bf16 with the same tiling in csrc/cpu/mlp_tiles_bf16.cpp):
//
//   per tile of rows:  h   = gelu_erf(y_tile @ W1^T + b1)                  [rows, D], in L2
//                      out = residual + gamma * (h @ W2^T + b2)
//
// Why not two library GEMMs per block (the onednn backend, or ATen GEMMs per row tile): at
// ConvNeXt-T's stage-1/2 shapes (C = 96/192, fc1's K = C) a GEMM call per layer either sends the
// [M, 4C] hidden to memory and back or, cut into row chunks, pays the library's per-call
// blocking for a short K. Here the hidden of a tile stays in L2, fc1's bias and GELU run on the
// accumulators and fc2's scale and residual add on its output tile. Measured on 2 threads of a
// Zen 4 (AVX-512), per block at batch 1 / 8: C = 96 2.9 / 21.1 ms against the onednn backend's
// 4.0 / 29.0, C = 192 2.6 / 19.5 against 3.3 / 24.4, C = 384 and 768 within 5% of it.
//
// The weights are packed once per weight version (derived_cache.h) into panels of kPanel columns
// of B[k][n] (B = W^T: fc1 reads W1 [D, C] as B [C, D]), each panel [K][width] contiguous, so the
// microkernel streams one panel row (NV vectors) per k and broadcasts MR values of A: MR x NV
// accumulators in registers (AVX-512: 6 x 4 zmm of the 32; AVX2: 6 x 2 ymm of the 16), MR + NV
// loads per MR * NV FMAs. Columns are padded with zeros to whole vectors; the last panel of a
// matrix may hold fewer vectors than kPanel (e.g. C = 96: 64 + 32 columns).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cpu_vec.h"

namespace convnext_fast {
namespace cpu {

// Vectors per panel and rows per microkernel tile: the accumulators, NV panel vectors and one
// broadcast fill the vector registers (AVX-512: 24 + 4 + 1 of 32; AVX2: 12 + 2 + 1 of 16).
constexpr int kPanelVecs = Vec::size() == 16 ? 4 : 2;
constexpr int kTileRowsMR = 6;
constexpr int64_t kPanel = kPanelVecs * Vec::size();

// Columns of B (N) padded to whole vectors.
inline int64_t padded_cols(int64_t n) { return (n + Vec::size() - 1) / Vec::size() * Vec::size(); }

// B [K, N] given as W [N, K] (row n of W is column n of B), packed into panels: panel j holds
// columns [j * kPanel, ...) as [K][width_j], width_j = min(kPanel, padded_cols(N) - j * kPanel),
// and starts at float offset j * kPanel * K. `dst` holds K * padded_cols(N) floats.
inline void pack_panels(const float* w, int64_t N, int64_t K, float* dst) {
  const int64_t Np = padded_cols(N);
  for (int64_t j0 = 0; j0 < Np; j0 += kPanel) {
    const int64_t width = std::min(kPanel, Np - j0);
    float* panel = dst + j0 * K;
    for (int64_t j = 0; j < width; ++j) {  // W's rows are read in order, the panel written strided
      const int64_t n = j0 + j;
      for (int64_t k = 0; k < K; ++k) panel[k * width + j] = n < N ? w[n * K + k] : 0.f;
    }
  }
}

// The microkernel, as a policy: Mac::run<R, NV>(acc, a, lda, panel, K) adds to acc[r][v] the
// sum over k < K of a[r * lda + k] * B[k][v * L ..] for r < R, from a panel of NV vectors per
// row of B. Mac::E is the element type of A and the panels; K and the offsets along it count
// elements, and panels are laid out so that k0 rows of B start k0 * NV * L elements in (fp32:
// [K][NV * L]; bf16, mlp_tiles_bf16.cpp: pairs of k interleaved, [K / 2][NV * L][2]).
struct Fp32Mac {
  using E = float;
  static constexpr int64_t kSumBlock = 128;
  template <int R, int NV>
  static void run(Vec (&acc)[R][NV], const float* a, int64_t lda, const float* panel, int64_t K) {
    constexpr int64_t L = Vec::size();
    for (int64_t k = 0; k < K; ++k) {
      Vec b[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) b[v] = Vec::loadu(panel + k * NV * L + v * L);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const Vec x(a[r * lda + k]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(x, b[v], acc[r][v]);
      }
    }
  }
};

// What happens to a finished tile of accumulators (rows r < R, vectors v < NV of columns from
// col): fc1 stores gelu(acc) into the hidden; fc2 scales by gamma, adds the residual and stores
// the output's `cols` valid columns.
struct GeluStore {
  float* h;
  int64_t ldh;
  template <int R, int NV>
  void operator()(Vec (&acc)[R][NV], int64_t row, int64_t col) const {
    constexpr int64_t L = Vec::size();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) gelu_erf(acc[r][v]).store(h + (row + r) * ldh + col + v * L);
    }
  }
};

struct ResidualStore {
  float* out;
  const float* residual;  // may be null
  const float* gamma;     // may be null; padded to whole vectors
  int64_t ld, cols;       // row stride of out/residual; valid columns (C)
  template <int R, int NV>
  void operator()(Vec (&acc)[R][NV], int64_t row, int64_t col) const {
    constexpr int64_t L = Vec::size();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        const int64_t c = col + v * L, off = (row + r) * ld + c, n = std::min<int64_t>(L, cols - c);
        if (n <= 0) break;
        Vec x = acc[r][v];
        if (gamma != nullptr) x = x * Vec::loadu(gamma + c);
        if (n == L) {
          if (residual != nullptr) x = x + Vec::loadu(residual + off);
          x.store(out + off);
        } else {
          if (residual != nullptr) x = x + Vec::loadu(residual + off, n);
          x.store(out + off, n);
        }
      }
    }
  }
};

// K is summed in blocks of Mac::kSumBlock, each block's sums added to running totals in L1: in
// fp32 one chain of K adds per output would carry ~sqrt(K) roundings (at K = 3072, 7x PyTorch's
// own error on the block); the totals cost R * NV loads and stores per kSumBlock * R * NV FMAs.

template <typename Mac, int R, int NV, typename Store>
inline void tile(const typename Mac::E* a, int64_t lda, const typename Mac::E* panel, int64_t K,
                 const float* bias, int64_t row, int64_t col, const Store& store) {
  constexpr int64_t L = Vec::size();
  Vec acc[R][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const Vec b = bias != nullptr ? Vec::loadu(bias + col + v * L) : Vec(0.f);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][v] = b;
  }
  a += row * lda;
  constexpr int64_t kSumBlock = Mac::kSumBlock;
  if (K <= kSumBlock) {
    Mac::template run<R, NV>(acc, a, lda, panel, K);
  } else {
    alignas(64) float total[R][NV][L];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v].store(total[r][v]);
    }
    for (int64_t k0 = 0; k0 < K; k0 += kSumBlock) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = Vec(0.f);
      }
      Mac::template run<R, NV>(acc, a + k0, lda, panel + k0 * NV * L, std::min(kSumBlock, K - k0));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) (Vec::loadu(total[r][v]) + acc[r][v]).store(total[r][v]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec::loadu(total[r][v]);
    }
  }
  store.template operator()<R, NV>(acc, row, col);
}

// Rows [0, M) of A times one panel of NV vectors: tiles of MR rows, then the remainder.
template <typename Mac, int MR, int NV, typename Store>
inline void panel_rows(const typename Mac::E* a, int64_t lda, const typename Mac::E* panel,
                       int64_t K, const float* bias, int64_t M, int64_t col, const Store& store) {
  int64_t r = 0;
  for (; r + MR <= M; r += MR) tile<Mac, MR, NV>(a, lda, panel, K, bias, r, col, store);
  switch (M - r) {
#define CONVNEXT_FAST_TILE_ROWS(n) \
  case n:                          \
    if constexpr (n < MR) tile<Mac, n, NV>(a, lda, panel, K, bias, r, col, store); \
    break;
    CONVNEXT_FAST_TILE_ROWS(1)
    CONVNEXT_FAST_TILE_ROWS(2)
    CONVNEXT_FAST_TILE_ROWS(3)
    CONVNEXT_FAST_TILE_ROWS(4)
    CONVNEXT_FAST_TILE_ROWS(5)
    CONVNEXT_FAST_TILE_ROWS(6)
    CONVNEXT_FAST_TILE_ROWS(7)
    CONVNEXT_FAST_TILE_ROWS(8)
    CONVNEXT_FAST_TILE_ROWS(9)
    CONVNEXT_FAST_TILE_ROWS(10)
    CONVNEXT_FAST_TILE_ROWS(11)
#undef CONVNEXT_FAST_TILE_ROWS
    default:
      break;
  }
}

// out[M, N] = store(A[M, K] @ B + bias) with B packed by pack_panels (N padded to vectors).
// A narrower last panel keeps the accumulator count: 2 x MR rows of half as many vectors.
// Panels [p0, p1) only, when given (num_panels(N) in all).
inline int64_t num_panels(int64_t N) { return (padded_cols(N) + kPanel - 1) / kPanel; }

template <typename Mac, typename Store>
inline void gemm_panels(const typename Mac::E* a, int64_t lda, const typename Mac::E* packed,
                        int64_t K, int64_t N, const float* bias, int64_t M, const Store& store,
                        int64_t p0 = 0, int64_t p1 = -1) {
  constexpr int64_t L = Vec::size();
  const int64_t Np = padded_cols(N);
  const int64_t end = p1 < 0 ? Np : std::min(Np, p1 * kPanel);
  for (int64_t j0 = p0 * kPanel; j0 < end; j0 += kPanel) {
    const typename Mac::E* panel = packed + j0 * K;
    const int64_t nv = std::min(kPanel, Np - j0) / L;
    if constexpr (kPanelVecs == 4) {
      switch (nv) {
        case 4: panel_rows<Mac, kTileRowsMR, 4>(a, lda, panel, K, bias, M, j0, store); break;
        case 3: panel_rows<Mac, 8, 3>(a, lda, panel, K, bias, M, j0, store); break;
        case 2: panel_rows<Mac, 12, 2>(a, lda, panel, K, bias, M, j0, store); break;
        default: panel_rows<Mac, 12, 1>(a, lda, panel, K, bias, M, j0, store); break;
      }
    } else {
      if (nv == 2) {
        panel_rows<Mac, kTileRowsMR, 2>(a, lda, panel, K, bias, M, j0, store);
      } else {
        panel_rows<Mac, 12, 1>(a, lda, panel, K, bias, M, j0, store);
      }
    }
  }
}

// Rows per tile: the hidden of a tile ([rows, D] fp32) stays near L2-sized, but a tile keeps at
// least kMinTileRows rows, since every tile streams both weight matrices once.
constexpr int64_t kHiddenTileBytes = int64_t{256} << 10;
constexpr int64_t kMinTileRows = 48;
// From this hidden width on, rows are split by columns (below): at D = 3072 every row tile
// streamed both matrices (19 MB) from L3 again, and batch 8 took 20.0 vs 19.2 ms per block with
// AVX-512, 31.0 vs 27.2 with AVX2 (2 Zen 4 threads); at D = 1536 rows were faster (19.9 vs 21.2,
// 22.7 vs 24.6).
constexpr int64_t kColumnsFromD = 2048;
// Up to this many rows, too: a few short row tiles each stream all of both matrices. Measured
// like a model runs (the blocks' weights cycled, so they come from L3 or memory), ConvNeXt-T's
// stage 3 at batch 1 (M = 196) took 2.99 ms per block split by columns vs 3.41 by rows in fp32,
// 1.83 vs 2.02 in bf16; stage 2 (M = 784) 3.71 vs 2.99 and 2.49 vs 1.88.
constexpr int64_t kColumnsMaxRows = 256;
// Rows per block when split by columns: the [rows, D] hidden of a block stays in L3.
constexpr int64_t kColumnBlockBytes = int64_t{2} << 20;

// Shares the block MLP on M rows between threads; fc1(r0, n, h, p0, p1) computes rows
// [r0, r0 + n) of the hidden's panels [p0, p1) (p1 = -1: to the last) into h (row stride
// padded_cols(D), elements of T), fc2(r0, n, h, p0, p1) the same rows of the output's panels from
// h's n rows. Two ways:
// - rows: tiles of rows in parallel, each thread with its own hidden tile (in L2);
// - columns: blocks of rows one after the other, inside each fc1's panels in parallel into the
//   block's [rows, D] hidden, then fc2's, so each weight panel is read once per block. Taken
//   when there are few rows (kColumnsMaxRows, or no more row tiles than threads: ConvNeXt-T's
//   stage 4 at batch 1, M = 49, split by rows, would read all of both matrices once per thread)
//   and for wide hiddens (kColumnsFromD).
// CONVNEXT_FAST_MLP_TILES_SPLIT=rows|columns forces one (the tests run both at every shape).
template <typename T, typename Fc1, typename Fc2>
inline void split_mlp(int64_t M, int64_t C, int64_t D, const Fc1& fc1, const Fc2& fc2) {
  constexpr int64_t MR = kTileRowsMR;
  const auto round_rows = [](int64_t r) { return (r + MR - 1) / MR * MR; };
  const int64_t Dp = padded_cols(D), row_bytes = Dp * int64_t{sizeof(T)};
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  int64_t rows = round_rows(std::max(kMinTileRows, kHiddenTileBytes / row_bytes));
  int64_t tiles = (M + rows - 1) / rows;
  bool by_columns =
      threads > 1 && (tiles <= threads || M <= kColumnsMaxRows || D >= kColumnsFromD);
  const char* mode = std::getenv("CONVNEXT_FAST_MLP_TILES_SPLIT");
  if (mode != nullptr && *mode != '\0' && std::strcmp(mode, "auto") != 0) {
    TORCH_CHECK(std::strcmp(mode, "rows") == 0 || std::strcmp(mode, "columns") == 0,
                "CONVNEXT_FAST_MLP_TILES_SPLIT must be 'auto', 'rows' or 'columns', got '", mode, "'");
    by_columns = mode[0] == 'c';
  }
  if (by_columns) {
    const int64_t block = tiles <= threads && threads > 1
                              ? M
                              : round_rows(std::max<int64_t>(MR, kColumnBlockBytes / row_bytes));
    const ThreadScratch h_mem(std::min(block, M) * Dp, sizeof(T));
    T* h = h_mem.data<T>();
    for (int64_t r0 = 0; r0 < M; r0 += block) {
      const int64_t n = std::min(block, M - r0);
      at::parallel_for(0, num_panels(D), 1, [&](int64_t p0, int64_t p1) { fc1(r0, n, h, p0, p1); });
      at::parallel_for(0, num_panels(C), 1, [&](int64_t p0, int64_t p1) { fc2(r0, n, h, p0, p1); });
    }
    return;
  }
  // Each thread takes an equal share of the MR-row micro-tiles, cut into tiles of at most `rows`:
  // whole tiles shared out left one thread a tile's worth of rows more whenever M / tiles was
  // rounded up to MR (ConvNeXt-T's stage 2 at batch 1, M = 784: 420 vs 364 rows).
  const int64_t micro = (M + MR - 1) / MR, shares = std::min(threads, micro);
  at::parallel_for(0, shares, 1, [&](int64_t s0, int64_t s1) {
    const ThreadScratch h_mem(std::min(rows, M) * Dp, sizeof(T));
    T* h = h_mem.data<T>();
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t begin = micro * s / shares * MR, end = std::min(M, micro * (s + 1) / shares * MR);
      const int64_t n_tiles = (end - begin + rows - 1) / rows, m0 = (end - begin + MR - 1) / MR;
      for (int64_t t = 0; t < n_tiles; ++t) {  // tiles of equal micro-tile counts
        const int64_t r0 = begin + m0 * t / n_tiles * MR;
        const int64_t r1 = std::min(end, begin + m0 * (t + 1) / n_tiles * MR);
        fc1(r0, r1 - r0, h, 0, -1);
        fc2(r0, r1 - r0, h, 0, -1);
      }
    }
  });
}

// Shares one GEMM on M rows (N columns of output) between threads: gemm(r0, n, p0, p1) computes
// rows [r0, r0 + n) of panels [p0, p1) (p1 = -1: to the last). By panels when the rows are few
// (each panel read once, as split_mlp's columns), else each thread an equal share of the MR-row
// micro-tiles, in blocks whose A rows stay in L2 while every panel passes over them.
template <typename T, typename Gemm>
inline void split_gemm(int64_t M, int64_t K, int64_t N, const Gemm& gemm) {
  constexpr int64_t MR = kTileRowsMR;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads > 1 && M <= kColumnsMaxRows) {
    at::parallel_for(0, num_panels(N), 1, [&](int64_t p0, int64_t p1) { gemm(0, M, p0, p1); });
    return;
  }
  const int64_t block = std::max<int64_t>(1, kHiddenTileBytes / (K * int64_t{sizeof(T)}) / MR) * MR;
  const int64_t micro = (M + MR - 1) / MR, shares = std::max<int64_t>(1, std::min(threads, micro));
  at::parallel_for(0, shares, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t begin = micro * s / shares * MR, end = std::min(M, micro * (s + 1) / shares * MR);
      for (int64_t r0 = begin; r0 < end; r0 += block) gemm(r0, std::min(block, end - r0), 0, -1);
    }
  });
}

// out [M, N] = A [M, K] @ B + bias (fp32, row-major, ld N) with B packed by pack_panels; bias
// padded to whole vectors, may be null.
inline void gemm_tiles_fwd(const float* a, int64_t M, int64_t K, const float* packed, int64_t N,
                           const float* bias, float* out) {
  split_gemm<float>(M, K, N, [&](int64_t r0, int64_t n, int64_t p0, int64_t p1) {
    gemm_panels<Fp32Mac>(a + r0 * K, K, packed, K, N, bias, n,
                         ResidualStore{out + r0 * N, nullptr, nullptr, N, N}, p0, p1);
  });
}

// The block MLP on M rows of y [M, C] with microkernel Mac and its stores: fc1's tiles end in
// Gelu{h, ldh}, fc2's in Residual{out, residual, gamma, ld, cols}; y, the packed weights, the
// hidden, the residual and out are Mac::E, the vectors fp32.
template <typename Mac, typename Gelu, typename Residual>
inline void tiles_mlp(const typename Mac::E* y, int64_t M, int64_t C, int64_t D,
                      const typename Mac::E* w1p, const float* b1, const typename Mac::E* w2p,
                      const float* b2, const float* gamma, const typename Mac::E* residual,
                      typename Mac::E* out) {
  using E = typename Mac::E;
  const int64_t Dp = padded_cols(D);
  split_mlp<E>(
      M, C, D,
      [&](int64_t r0, int64_t n, E* h, int64_t p0, int64_t p1) {
        gemm_panels<Mac>(y + r0 * C, C, w1p, C, D, b1, n, Gelu{h, Dp}, p0, p1);
      },
      [&](int64_t r0, int64_t n, const E* h, int64_t p0, int64_t p1) {
        gemm_panels<Mac>(h, Dp, w2p, D, C, b2, n,
                         Residual{out + r0 * C, residual != nullptr ? residual + r0 * C : nullptr,
                                  gamma, C, C},
                         p0, p1);
      });
}

// The block MLP (see the top of this file) on M rows of y [M, C] (row-major, NHWC's rows):
// out [M, C] = residual + gamma * (gelu(y @ W1^T + b1) @ W2^T + b2). w1p / w2p: W1 [D, C] / W2
// [C, D] packed by pack_panels; b1 [padded_cols(D)], b2 and gamma [padded_cols(C)] zero-padded,
// each may be null, as may residual (then out = gamma * (...)).
inline void mlp_tiles_fwd(const float* y, int64_t M, int64_t C, int64_t D, const float* w1p,
                          const float* b1, const float* w2p, const float* b2, const float* gamma,
                          const float* residual, float* out) {
  tiles_mlp<Fp32Mac, GeluStore, ResidualStore>(y, M, C, D, w1p, b1, w2p, b2, gamma, residual, out);
}

// bf16 on AVX512-BF16 dot products (csrc/cpu/mlp_tiles_bf16.cpp): whether this build and CPU
// run them (AVX512-BF16 without AMX); W [N, K] (K even) packed with pairs of k interleaved
// (K * padded_cols(N) elements); the block MLP as mlp_tiles_fwd with y, the packed weights, the
// residual and out in bf16 (C and D even) and b1, b2, gamma fp32.
bool tiles_bf16_supported();
void pack_panels_bf16(const c10::BFloat16* w, int64_t N, int64_t K, c10::BFloat16* dst);
void mlp_tiles_fwd_bf16(const c10::BFloat16* y, int64_t M, int64_t C, int64_t D,
                        const c10::BFloat16* w1p, const float* b1, const c10::BFloat16* w2p,
                        const float* b2, const float* gamma, const c10::BFloat16* residual,
                        c10::BFloat16* out);
// gemm_tiles_fwd in bf16 (A, the packed B and out; K even), on the same dot products.
void gemm_tiles_fwd_bf16(const c10::BFloat16* a, int64_t M, int64_t K, const c10::BFloat16* packed,
                         int64_t N, const float* bias, c10::BFloat16* out);

}  // namespace cpu
}  // namespace convnext_fast

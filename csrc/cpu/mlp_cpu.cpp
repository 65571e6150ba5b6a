// mlp forward and backward on the CPU, fused over row tiles of the [M = N*H*W, C] matrix that the
// channels_last trunk already is:
//
//   forward, per tile of TM rows:  h = gelu_erf(y_tile @ W1^T + b1)        [TM, D], stays in cache
//                                  out_tile = residual + gamma * (h @ W2^T + b2)
//
// so the [M, D] hidden never goes to memory. The GEMMs are ATen's (at::mm_out into tile buffers:
// MKL/oneDNN underneath), the bias/GELU and output epilogues are at::vec loops over the tile.
// Arithmetic is fp32 for fp32/bf16/fp16 (fp64 for fp64): reduced-precision tiles are widened to
// fp32 in cache and the weights converted once per call, because an AVX2 CPU has no native bf16
// GEMM (ATen's bf16 mm runs at ~1/10 of its fp32 rate on the 2-core dev machine). Where oneDNN
// has native bf16/fp16 (AVX512-BF16, AMX, AVX512-FP16; ATen's bf16 mm then is oneDNN's, ~3x its
// fp32 rate with AMX) the forward keeps y, the weights and the hidden tile in the storage dtype
// for the GEMMs, as PyTorch's bf16 Linear does, and runs only the epilogues in fp32
// (mlp_fwd_native; CONVNEXT_FAST_CPU_GEMM=native|fp32 overrides the choice).
//
// Inference (no gradient, eager; fp32, and bf16 on AVX512-BF16) runs instead on packed weights
// with our own microkernels (mlp_tiles.h), where the build has AVX2 or AVX-512: see use_tiles().
//
// Parallelism (measured, benchmarks/results/cpu2core_ops.txt): with at least two tiles, tiles run
// in parallel (at::parallel_for) with each GEMM single-threaded inside (7% faster than tiles in
// sequence with multi-threaded GEMMs at batch 8); a single tile (small M) is split along the
// hidden dimension instead, one slice per thread, the slices' fc2 products added in order.
//
// Backward: saves nothing but y and the parameters (the autograd context holds y: M*C elements in
// y's dtype); the pre-activation and hidden of a tile are recomputed from y, so the extra memory is
// per-thread tile buffers (~3 x TM x D fp32) plus one fp32 [C, D] + [D, C] partial per chunk.
// Rows are cut into a fixed number of chunks (a function of M and the tile size only, never of
// the thread count); each chunk sums its tiles' weight gradients in order with single-threaded
// GEMMs, and the chunk partials are added in chunk order, so the weight gradients do not depend on
// the thread count. (With a single chunk the GEMMs are multi-threaded and the result is
// reproducible at a fixed thread count, as ATen's own GEMMs are.)
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../include/checks.h"
#include "../include/cpu_vec.h"
#include "../include/derived_cache.h"
#include "../include/mlp_cpu.h"
#include "../include/mlp_tiles.h"

namespace convnext_fast {
namespace {

// Rows per tile when there are enough rows (CONVNEXT_FAST_MLP_CPU_TILE overrides it, for tuning).
constexpr int64_t kTileRows = 256;
// Chunks of the backward's row range, each with its own weight-gradient partials.
constexpr int64_t kBwdChunks = 4;

int64_t tile_rows_setting() {
  static const int64_t rows = [] {
    const char* v = std::getenv("CONVNEXT_FAST_MLP_CPU_TILE");
    const long n = v != nullptr ? std::strtol(v, nullptr, 10) : 0;
    return n > 0 ? static_cast<int64_t>(n) : kTileRows;
  }();
  return rows;
}

// CONVNEXT_FAST_MLP_CPU_SEQUENTIAL=1 runs the forward's tiles one after another with
// multi-threaded GEMMs instead of in parallel (kept for the measurement that chose the default).
bool sequential_tiles() {
  static const bool on = [] {
    const char* v = std::getenv("CONVNEXT_FAST_MLP_CPU_SEQUENTIAL");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

template <typename src_t, typename dst_t>
inline void convert(const src_t* src, dst_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::memcpy(dst, src, n * sizeof(dst_t));
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename acc_t>
inline acc_t gelu_scalar(acc_t x) {
  return acc_t(0.5) * x * (acc_t(1) + std::erf(x * acc_t(M_SQRT1_2)));
}

// h[r, :] = gelu_erf(h[r, :] + b1) for rows [r0, r1) of a [*, D] buffer.
template <typename acc_t>
void bias_gelu_rows(acc_t* h, const acc_t* b1, int64_t r0, int64_t r1, int64_t D) {
  using V = Vec<acc_t>;
  for (int64_t r = r0; r < r1; ++r) {
    acc_t* row = h + r * D;
    int64_t d = 0;
    for (; d + V::size() <= D; d += V::size()) {
      V x = V::loadu(row + d);
      if (b1 != nullptr) x = x + V::loadu(b1 + d);
      cpu::gelu_erf(x).store(row + d);
    }
    for (; d < D; ++d) row[d] = gelu_scalar(b1 != nullptr ? row[d] + b1[d] : row[d]);
  }
}

// out[r, :] = residual[r, :] + gamma * (o[r, :] + b2) for rows [r0, r1); o is a tile buffer, or
// the sum of `parts` partial products part_stride apart (added in order), residual/out are rows of
// the NHWC tensors (already offset to the tile).
template <typename scalar_t, typename acc_t>
void output_rows(const acc_t* o, const acc_t* b2, const acc_t* gamma, const scalar_t* residual,
                 scalar_t* out, acc_t* scratch, int64_t r0, int64_t r1, int64_t C,
                 int64_t parts = 1, int64_t part_stride = 0) {
  using V = Vec<acc_t>;
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  for (int64_t r = r0; r < r1; ++r) {
    const acc_t* orow = o + r * C;
    // fp32/fp64 rows are read and written in place; reduced precision goes through the fp32
    // scratch row.
    const acc_t* res = nullptr;
    acc_t* dst;
    if constexpr (kSame) {
      if (residual != nullptr) res = residual + r * C;
      dst = out + r * C;
    } else {
      if (residual != nullptr) {
        convert(residual + r * C, scratch, C);
        res = scratch;
      }
      dst = scratch;
    }
    int64_t c = 0;
    for (; c + V::size() <= C; c += V::size()) {
      V v = V::loadu(orow + c);
      for (int64_t q = 1; q < parts; ++q) v = v + V::loadu(orow + q * part_stride + c);
      if (b2 != nullptr) v = v + V::loadu(b2 + c);
      if (gamma != nullptr) v = v * V::loadu(gamma + c);
      if (res != nullptr) v = v + V::loadu(res + c);
      v.store(dst + c);
    }
    for (; c < C; ++c) {
      acc_t v = orow[c];
      for (int64_t q = 1; q < parts; ++q) v += orow[q * part_stride + c];
      if (b2 != nullptr) v += b2[c];
      if (gamma != nullptr) v *= gamma[c];
      if (res != nullptr) v += res[c];
      dst[c] = v;
    }
    if constexpr (!kSame) convert(scratch, out + r * C, C);
  }
}

// Runs f(r0, r1) over [0, rows): in parallel when called outside a parallel region (a tile on the
// calling thread), inline inside one (a tile already owned by one thread).
template <typename F>
void rows_loop(int64_t rows, const F& f) {
  if (at::in_parallel_region()) {
    f(0, rows);
  } else {
    at::parallel_for(0, rows, 8, f);
  }
}

struct Tiling {
  int64_t tiles, rows;  // number of tiles and rows per tile (the last may be shorter)
};

// Tiles of about `target` rows; with several tiles their count is a multiple of `multiple` so
// that parallel tiles balance.
Tiling make_tiling(int64_t M, int64_t target, int64_t multiple) {
  int64_t tiles = std::max<int64_t>(1, (M + target - 1) / target);
  if (tiles > 1) tiles = (tiles + multiple - 1) / multiple * multiple;
  tiles = std::min(tiles, std::max<int64_t>(1, M));
  const int64_t rows = (M + tiles - 1) / tiles;
  return {(M + rows - 1) / rows, rows};
}

struct MlpParams {
  at::Tensor w1, w2, b1, b2, gamma;  // in the compute dtype, contiguous; undefined when absent
};

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

// The weights in `gemm` (the GEMMs' dtype), the bias and layer-scale vectors in `acc` (the
// epilogues' dtype).
MlpParams compute_params(const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                         const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                         const std::optional<at::Tensor>& gamma, at::ScalarType acc,
                         std::optional<at::ScalarType> gemm = std::nullopt) {
  // Detached, and every parallel region below re-enters the caller's thread-local state
  // (at::ThreadLocalStateGuard): the GEMMs also run on at::parallel_for's worker threads, where
  // the caller's autograd/inference-mode guards would not otherwise reach.
  auto conv_opt = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? converted_weight(*t, acc) : at::Tensor();
  };
  const at::ScalarType wt = gemm.value_or(acc);
  // converted once per version (derived_cache.h): a bf16 model on a CPU whose GEMMs run in fp32
  // converted both [4C, C] matrices per call, ~8 ms at C = 768, batch 1
  return {converted_weight(w1, wt), converted_weight(w2, wt), conv_opt(b1), conv_opt(b2),
          conv_opt(gamma)};
}

void check_mlp(const char* op, const at::Tensor& y, const at::Tensor& w1,
               const std::optional<at::Tensor>& b1, const at::Tensor& w2,
               const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& gamma) {
  TORCH_CHECK(y.dim() == 4, op, ": y must be 4-D [N, C, H, W], got ", y.sizes());
  TORCH_CHECK(y.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": y must be channels_last-contiguous (NHWC memory); call "
              ".contiguous(memory_format=torch.channels_last)");
  const int64_t C = y.size(1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C, op, ": fc1_weight must have shape [D, ", C,
              "], got ", w1.sizes());
  const int64_t D = w1.size(0);
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == C && w2.size(1) == D, op,
              ": fc2_weight must have shape [", C, ", ", D, "], got ", w2.sizes());
  auto same = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.device() == y.device(), op, ": ", name, " is on ", t.device(), " but y is on ",
                y.device());
    TORCH_CHECK(t.scalar_type() == y.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                " but y has ", y.scalar_type());
  };
  same("fc1_weight", w1);
  same("fc2_weight", w2);
  auto vec = [&](const char* name, const std::optional<at::Tensor>& t, int64_t n) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n, op, ": ", name, " must have shape [", n,
                "], got ", t->sizes());
    same(name, *t);
  };
  vec("fc1_bias", b1, D);
  vec("fc2_bias", b2, C);
  vec("gamma", gamma, C);
  const auto st = y.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, op,
              ": y must be float32, bfloat16, float16 or float64, got ", st);
}

// ---------------------------------------------------------------------------------------------
// forward

// Hidden slices of at least this many columns (narrower ones make inefficient GEMMs).
constexpr int64_t kMinHiddenPart = 128;

// With a single row tile and several threads, the hidden dimension D is split instead: each
// thread owns a slice of the hidden columns (its GEMMs single-threaded), and the slices' fc2
// partial products are added in slice order. Returns the number of slices (1: no split).
int64_t hidden_parts(const Tiling& tl, int64_t D) {
  if (tl.tiles != 1 || sequential_tiles() || at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), D / kMinHiddenPart));
}

template <typename scalar_t, typename acc_t>
void mlp_fwd_split_hidden(const at::Tensor& y2d, const scalar_t* y_ptr, const MlpParams& p,
                          const scalar_t* residual, scalar_t* out_ptr, int64_t parts) {
  const int64_t M = y2d.size(0), C = y2d.size(1), D = p.w1.size(0);
  const auto opts = y2d.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  constexpr int64_t kAlign = 16;
  const int64_t width = ((D + parts - 1) / parts + kAlign - 1) / kAlign * kAlign;
  const cpu::ThreadScratch yt_mem(std::is_same_v<scalar_t, acc_t> ? 0 : M * C, sizeof(acc_t));
  at::Tensor yt;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    yt = y2d;
  } else {
    yt = yt_mem.tensor({M, C}, opts);
    acc_t* dst = yt.data_ptr<acc_t>();
    at::parallel_for(0, M, 8, [&](int64_t a, int64_t b) {
      convert(y_ptr + a * C, dst + a * C, (b - a) * C);
    });
  }
  const at::Tensor w1t = p.w1.t(), w2t = p.w2.t();
  const acc_t *b1 = ptr_or_null<acc_t>(p.b1), *b2 = ptr_or_null<acc_t>(p.b2),
              *gamma = ptr_or_null<acc_t>(p.gamma);
  const cpu::ThreadScratch partial_mem(parts * M * C, sizeof(acc_t));
  const at::Tensor partial = partial_mem.tensor({parts, M, C}, opts);
  const at::ThreadLocalState tls;
  at::parallel_for(0, parts, 1, [&](int64_t q_begin, int64_t q_end) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    for (int64_t q = q_begin; q < q_end; ++q) {
      const int64_t d0 = q * width, dn = std::min(width, D - d0);
      at::Tensor o = partial[q];
      if (dn <= 0) {
        o.zero_();
        continue;
      }
      const cpu::ThreadScratch h_mem(M * dn, sizeof(acc_t));
      at::Tensor h = h_mem.tensor({M, dn}, opts);
      at::mm_out(h, yt, w1t.narrow(1, d0, dn));
      bias_gelu_rows(h.data_ptr<acc_t>(), b1 != nullptr ? b1 + d0 : nullptr, 0, M, dn);
      at::mm_out(o, h, w2t.narrow(0, d0, dn));
    }
  });
  // The slices' partial products are summed in slice order inside the output epilogue.
  const acc_t* op_ = partial.data_ptr<acc_t>();
  at::parallel_for(0, M, 8, [&](int64_t a, int64_t b) {
    std::vector<acc_t> scratch(C);
    output_rows<scalar_t, acc_t>(op_, b2, gamma, residual, out_ptr, scratch.data(), a, b, C, parts,
                                 M * C);
  });
}

template <typename scalar_t, typename acc_t>
void mlp_fwd_kernel(const at::Tensor& y, const MlpParams& p, const scalar_t* residual,
                    at::Tensor& out) {
  const int64_t C = y.size(1), D = p.w1.size(0), M = y.numel() / C;
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  const auto opts = y.options().dtype(acc);
  const Tiling tl = make_tiling(M, tile_rows_setting(), at::get_num_threads());
  const at::Tensor w1t = p.w1.t(), w2t = p.w2.t();  // [C, D], [D, C] views: GEMMs read them transposed
  const scalar_t* y_ptr = y.data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const acc_t *b1 = ptr_or_null<acc_t>(p.b1), *b2 = ptr_or_null<acc_t>(p.b2),
              *gamma = ptr_or_null<acc_t>(p.gamma);
  const at::Tensor y2d = y.permute({0, 2, 3, 1}).reshape({M, C});  // a view: y is NHWC

  const at::ThreadLocalState tls;
  auto run_tiles = [&](int64_t t_begin, int64_t t_end) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    const cpu::ThreadScratch ybuf_mem(std::is_same_v<scalar_t, acc_t> ? 0 : tl.rows * C,
                                      sizeof(acc_t));
    const cpu::ThreadScratch hbuf_mem(tl.rows * D, sizeof(acc_t));
    const cpu::ThreadScratch obuf_mem(tl.rows * C, sizeof(acc_t));
    at::Tensor ybuf;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) ybuf = ybuf_mem.tensor({tl.rows, C}, opts);
    const at::Tensor hbuf = hbuf_mem.tensor({tl.rows, D}, opts);
    const at::Tensor obuf = obuf_mem.tensor({tl.rows, C}, opts);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t r0 = t * tl.rows, rows = std::min(tl.rows, M - r0);
      at::Tensor yt;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        yt = y2d.narrow(0, r0, rows);
      } else {
        yt = ybuf.narrow(0, 0, rows);
        acc_t* dst = yt.data_ptr<acc_t>();
        rows_loop(rows, [&](int64_t a, int64_t b) {
          convert(y_ptr + (r0 + a) * C, dst + a * C, (b - a) * C);
        });
      }
      at::Tensor h = hbuf.narrow(0, 0, rows), o = obuf.narrow(0, 0, rows);
      at::mm_out(h, yt, w1t);
      acc_t* hp = h.data_ptr<acc_t>();
      rows_loop(rows, [&](int64_t a, int64_t b) { bias_gelu_rows(hp, b1, a, b, D); });
      at::mm_out(o, h, w2t);
      const acc_t* op_ = o.data_ptr<acc_t>();
      rows_loop(rows, [&](int64_t a, int64_t b) {
        std::vector<acc_t> scratch(C);
        output_rows<scalar_t, acc_t>(op_, b2, gamma, residual ? residual + r0 * C : nullptr,
                                     out_ptr + r0 * C, scratch.data(), a, b, C);
      });
    }
  };
  const int64_t parts = hidden_parts(tl, D);
  if (parts > 1) {
    mlp_fwd_split_hidden<scalar_t, acc_t>(y2d, y_ptr, p, residual, out_ptr, parts);
  } else if (tl.tiles > 1 && !sequential_tiles()) {
    at::parallel_for(0, tl.tiles, 1, run_tiles);
  } else {
    run_tiles(0, tl.tiles);
  }
}

// Whether oneDNN computes this reduced dtype natively: the query behind
// torch.ops.mkldnn._is_mkldnn_bf16_supported (false on a torch build without oneDNN).
bool onednn_supports(const char* query) {
  try {
    const auto handle = c10::Dispatcher::singleton().findSchema({query, ""});
    return handle.has_value() && handle->typed<bool()>().call();
  } catch (const c10::Error&) {
    return false;
  }
}

}  // namespace

// CONVNEXT_FAST_CPU_GEMM=native|fp32 overrides the choice for bf16/fp16 (the tests run the native
// path on any CPU this way; ATen's fallback bf16 GEMM is slow there).
at::ScalarType mlp_cpu_gemm_dtype(at::ScalarType st) {
  if (st != at::kBFloat16 && st != at::kHalf) return st == at::kDouble ? at::kDouble : at::kFloat;
  const char* v = std::getenv("CONVNEXT_FAST_CPU_GEMM");
  if (v != nullptr && *v != '\0' && std::strcmp(v, "auto") != 0) {
    TORCH_CHECK(std::strcmp(v, "native") == 0 || std::strcmp(v, "fp32") == 0,
                "CONVNEXT_FAST_CPU_GEMM must be 'auto', 'native' or 'fp32', got '", v, "'");
    return std::strcmp(v, "native") == 0 ? st : at::kFloat;
  }
  static const bool bf16 = onednn_supports("mkldnn::_is_mkldnn_bf16_supported");
  static const bool fp16 = onednn_supports("mkldnn::_is_mkldnn_fp16_supported");
  return (st == at::kBFloat16 ? bf16 : fp16) ? st : at::kFloat;
}

bool mlp_cpu_tiles(at::ScalarType st) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const char* v = std::getenv("CONVNEXT_FAST_MLP_CPU_TILES");
  if (v != nullptr && std::strcmp(v, "0") == 0) return false;
  return st == at::kFloat ||
         (st == at::kBFloat16 && cpu::tiles_bf16_supported() && mlp_cpu_gemm_dtype(st) == st);
#else
  (void)st;
  return false;
#endif
}

namespace {

// Forward with GEMMs in the storage dtype (bf16/fp16; p.w1/p.w2 in it, p.b1/p.b2/p.gamma fp32):
// per tile h = y @ W1^T rounds to scalar_t like PyTorch's Linear, bias + GELU run in fp32 and
// round once, o = h @ W2^T, and the output epilogue runs in fp32 from o. Several tiles run in
// parallel with single-threaded GEMMs; a single tile (small M) leaves the threads to oneDNN.
template <typename scalar_t>
void mlp_fwd_native(const at::Tensor& y, const MlpParams& p, const scalar_t* residual,
                    at::Tensor& out) {
  const int64_t C = y.size(1), D = p.w1.size(0), M = y.numel() / C;
  const auto f32 = y.options().dtype(at::kFloat);
  const Tiling tl = make_tiling(M, tile_rows_setting(), at::get_num_threads());
  const at::Tensor w1t = p.w1.t(), w2t = p.w2.t();
  const at::Tensor y2d = y.permute({0, 2, 3, 1}).reshape({M, C});
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const float *b1 = ptr_or_null<float>(p.b1), *b2 = ptr_or_null<float>(p.b2),
              *gamma = ptr_or_null<float>(p.gamma);
  const at::ThreadLocalState tls;
  auto run_tiles = [&](int64_t t_begin, int64_t t_end) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    const int64_t es = y.element_size();
    const cpu::ThreadScratch hbuf_mem(tl.rows * D, es), obuf_mem(tl.rows * C, es);
    const cpu::ThreadScratch h32buf_mem(tl.rows * D), o32buf_mem(tl.rows * C);
    const at::Tensor hbuf = hbuf_mem.tensor({tl.rows, D}, y.options());
    const at::Tensor obuf = obuf_mem.tensor({tl.rows, C}, y.options());
    const at::Tensor h32buf = h32buf_mem.tensor({tl.rows, D}, f32);
    const at::Tensor o32buf = o32buf_mem.tensor({tl.rows, C}, f32);
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t r0 = t * tl.rows, rows = std::min(tl.rows, M - r0);
      at::Tensor h = hbuf.narrow(0, 0, rows), o = obuf.narrow(0, 0, rows);
      at::mm_out(h, y2d.narrow(0, r0, rows), w1t);
      scalar_t* hp = h.data_ptr<scalar_t>();
      float* h32 = h32buf.data_ptr<float>();
      rows_loop(rows, [&](int64_t a, int64_t b) {
        convert(hp + a * D, h32 + a * D, (b - a) * D);
        bias_gelu_rows(h32, b1, a, b, D);
        convert(h32 + a * D, hp + a * D, (b - a) * D);
      });
      at::mm_out(o, h, w2t);
      const scalar_t* op_ = o.data_ptr<scalar_t>();
      float* o32 = o32buf.data_ptr<float>();
      rows_loop(rows, [&](int64_t a, int64_t b) {
        convert(op_ + a * C, o32 + a * C, (b - a) * C);
        std::vector<float> scratch(C);
        output_rows<scalar_t, float>(o32, b2, gamma, residual ? residual + r0 * C : nullptr,
                                     out_ptr + r0 * C, scratch.data(), a, b, C);
      });
    }
  };
  if (tl.tiles > 1) {
    at::parallel_for(0, tl.tiles, 1, run_tiles);
  } else {
    run_tiles(0, 1);
  }
}

// Inference runs on the packed-weight tiles of mlp_tiles.h where mlp_cpu_tiles says so (the
// build's vector ISA has the registers for their microkernel: AVX2, AVX-512; bf16 where the CPU
// has AVX512-BF16 but no AMX, whose oneDNN GEMMs are faster, and CONVNEXT_FAST_CPU_GEMM is not
// fp32; CONVNEXT_FAST_MLP_CPU_TILES=0 turns them off, for measurements), bf16 with C and D even
// (the dot products take pairs along both GEMMs' K), and only while the packed weights are kept
// between calls (the derived cache is on: eager calls that need no gradient). Elsewhere
// (training, compiled graphs) packing per call would cost about as much as the call at C = 768,
// and the ATen GEMM tiles run.
bool use_tiles(const at::Tensor& y, const at::Tensor& fc1_weight) {
  if (!DerivedCache::enabled() || !mlp_cpu_tiles(y.scalar_type())) return false;
  return y.scalar_type() != at::kBFloat16 || (y.size(1) % 2 == 0 && fc1_weight.size(0) % 2 == 0);
}

// Tags of the derived-cache entries made here (conv_taps uses 1000-1003).
constexpr int64_t kPanelsTag = 1100, kPaddedTag = 1101, kPanelsBf16Tag = 1102;

// W [N, K] packed into the tiles' panels (cpu::pack_panels in fp32, pack_panels_bf16 for a bf16
// W), once per version.
at::Tensor packed_panels(const at::Tensor& w) {
  if (w.scalar_type() == at::kBFloat16) {
    return derived_cache().get(w, kPanelsBf16Tag, [](const at::Tensor& t) {
      const at::Tensor c = t.detach().contiguous();
      const int64_t N = c.size(0), K = c.size(1);
      at::Tensor out = at::empty({K * cpu::padded_cols(N)}, c.options());
      cpu::pack_panels_bf16(c.data_ptr<at::BFloat16>(), N, K, out.data_ptr<at::BFloat16>());
      return out;
    });
  }
  return derived_cache().get(w, kPanelsTag, [](const at::Tensor& t) {
    const at::Tensor f = t.detach().to(at::kFloat).contiguous();
    const int64_t N = f.size(0), K = f.size(1);
    at::Tensor out = at::empty({K * cpu::padded_cols(N)}, f.options());
    cpu::pack_panels(f.data_ptr<float>(), N, K, out.data_ptr<float>());
    return out;
  });
}

}  // namespace

at::Tensor padded_vector(const std::optional<at::Tensor>& v) {
  if (!v.has_value()) return {};
  return derived_cache().get(*v, kPaddedTag, [](const at::Tensor& t) {
    at::Tensor out = at::zeros({cpu::padded_cols(t.size(0))}, t.options().dtype(at::kFloat));
    out.narrow(0, 0, t.size(0)).copy_(t.detach());
    return out;
  });
}

namespace {

void mlp_fwd_tiles(const at::Tensor& y, const at::Tensor& fc1_weight,
                   const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                   const std::optional<at::Tensor>& fc2_bias, const std::optional<at::Tensor>& gamma,
                   const std::optional<at::Tensor>& residual, at::Tensor& out) {
  const int64_t C = y.size(1), D = fc1_weight.size(0), M = y.numel() / C;
  const at::Tensor w1p = packed_panels(fc1_weight), w2p = packed_panels(fc2_weight);
  const at::Tensor b1 = padded_vector(fc1_bias), b2 = padded_vector(fc2_bias);
  const at::Tensor g = padded_vector(gamma);
  if (y.scalar_type() == at::kBFloat16) {
    cpu::mlp_tiles_fwd_bf16(
        y.data_ptr<at::BFloat16>(), M, C, D, w1p.data_ptr<at::BFloat16>(), ptr_or_null<float>(b1),
        w2p.data_ptr<at::BFloat16>(), ptr_or_null<float>(b2), ptr_or_null<float>(g),
        residual.has_value() ? residual->data_ptr<at::BFloat16>() : nullptr,
        out.data_ptr<at::BFloat16>());
    return;
  }
  cpu::mlp_tiles_fwd(y.data_ptr<float>(), M, C, D, w1p.data_ptr<float>(), ptr_or_null<float>(b1),
                     w2p.data_ptr<float>(), ptr_or_null<float>(b2), ptr_or_null<float>(g),
                     residual.has_value() ? residual->data_ptr<float>() : nullptr,
                     out.data_ptr<float>());
}

at::Tensor mlp_cpu(const at::Tensor& y, const at::Tensor& fc1_weight,
                   const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                   const std::optional<at::Tensor>& fc2_bias, const std::optional<at::Tensor>& gamma,
                   const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "mlp";
  // y may require grad (this kernel runs under the op's autograd): the ATen calls below must not
  // record autograd history or refuse out= GEMMs.
  at::AutoDispatchBelowADInplaceOrView guard;
  check_mlp(op, y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma);
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == y.sizes(), op, ": residual must have y's shape ", y.sizes(),
                ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == y.scalar_type() && residual->device() == y.device(), op,
                ": residual must have y's dtype and device");
    TORCH_CHECK(residual->is_contiguous(at::MemoryFormat::ChannelsLast), op,
                ": residual must be channels_last-contiguous (NHWC memory)");
  }
  at::Tensor out = at::empty_like(y, at::MemoryFormat::ChannelsLast);
  if (poison_outputs()) out.fill_(NAN);
  if (y.numel() == 0) return out;
  const at::ScalarType gemm = mlp_cpu_gemm_dtype(y.scalar_type());
  const at::Tensor yd = y.detach();
  if (use_tiles(y, fc1_weight)) {
    mlp_fwd_tiles(yd, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, residual, out);
    return out;
  }
  if (gemm == at::kBFloat16 || gemm == at::kHalf) {  // storage-dtype GEMMs (native)
    const MlpParams p =
        compute_params(fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, at::kFloat, gemm);
    AT_DISPATCH_REDUCED_FLOATING_TYPES(y.scalar_type(), "mlp_cpu_native", [&] {
      const scalar_t* res = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
      mlp_fwd_native<scalar_t>(yd, p, res, out);
    });
    return out;
  }
  const MlpParams p = compute_params(fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, gemm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "mlp_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* res = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
    mlp_fwd_kernel<scalar_t, acc_t>(yd, p, res, out);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// backward

// For rows [r0, r1) of a tile: h = gelu(a + b1) and dg = gelu'(a + b1) from the pre-activation a
// (in h on entry).
template <typename acc_t>
void bias_gelu_grad_rows(acc_t* h, acc_t* dg, const acc_t* b1, int64_t r0, int64_t r1, int64_t D) {
  using V = Vec<acc_t>;
  const V norm(acc_t(0.3989422804014327)), mhalf(acc_t(-0.5));  // 1/sqrt(2 pi)
  for (int64_t r = r0; r < r1; ++r) {
    acc_t* hrow = h + r * D;
    acc_t* grow = dg + r * D;
    int64_t d = 0;
    for (; d + V::size() <= D; d += V::size()) {
      V x = V::loadu(hrow + d);
      if (b1 != nullptr) x = x + V::loadu(b1 + d);
      const V cdf = cpu::normal_cdf(x);
      (x * cdf).store(hrow + d);
      (cdf + x * norm * (mhalf * x * x).exp()).store(grow + d);
    }
    for (; d < D; ++d) {
      const acc_t x = b1 != nullptr ? hrow[d] + b1[d] : hrow[d];
      const acc_t cdf = acc_t(0.5) * (acc_t(1) + std::erf(x * acc_t(M_SQRT1_2)));
      hrow[d] = x * cdf;
      grow[d] = cdf + x * acc_t(0.3989422804014327) * std::exp(acc_t(-0.5) * x * x);
    }
  }
}

// sum[0:n] += column sums of rows [0, rows) of a [rows, n] buffer, rows in order.
template <typename acc_t>
void add_column_sums(acc_t* sum, const acc_t* a, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    at::vec::map2([](Vec<acc_t> s, Vec<acc_t> v) { return s + v; }, sum, sum, a + r * n, n);
  }
}

template <typename scalar_t, typename acc_t>
void mlp_bwd_kernel(const scalar_t* grad_ptr, const at::Tensor& y, const MlpParams& p,
                    scalar_t* dy_ptr, at::Tensor& G, at::Tensor& dW1, at::Tensor& sum_grad,
                    at::Tensor& db1) {
  const int64_t C = y.size(1), D = p.w1.size(0), M = y.numel() / C;
  const auto opts = y.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // Tiling and chunks depend on M and the tile setting only (never the thread count).
  const Tiling tl0 = make_tiling(M, tile_rows_setting(), 1);
  const int64_t n_chunks = tl0.tiles >= 3 ? kBwdChunks : tl0.tiles;
  const Tiling tl = make_tiling(M, tile_rows_setting(), n_chunks);
  const int64_t tiles_per_chunk = (tl.tiles + n_chunks - 1) / n_chunks;
  const at::Tensor w1t = p.w1.t(), w2t = p.w2.t();
  const acc_t *b1 = ptr_or_null<acc_t>(p.b1), *gamma = ptr_or_null<acc_t>(p.gamma);
  const scalar_t* y_ptr = y.data_ptr<scalar_t>();
  const at::Tensor y2d = y.permute({0, 2, 3, 1}).reshape({M, C});

  // Per chunk: G = grad^T @ h [C, D], dW1 [D, C], column sums of grad [C] and of da [D].
  std::vector<at::Tensor> parts_G(n_chunks), parts_W1(n_chunks), parts_sg(n_chunks),
      parts_b1(n_chunks);
  const at::ThreadLocalState tls;
  auto run_chunks = [&](int64_t c_begin, int64_t c_end) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    at::Tensor ybuf = at::empty({tl.rows, C}, opts), gbuf = at::empty({tl.rows, C}, opts);
    at::Tensor gobuf = at::empty({tl.rows, C}, opts), dybuf = at::empty({tl.rows, C}, opts);
    at::Tensor hbuf = at::empty({tl.rows, D}, opts), dgbuf = at::empty({tl.rows, D}, opts);
    at::Tensor dhbuf = at::empty({tl.rows, D}, opts);
    for (int64_t ch = c_begin; ch < c_end; ++ch) {
      at::Tensor Gc = at::zeros({C, D}, opts), W1c = at::zeros({D, C}, opts);
      at::Tensor sgc = at::zeros({C}, opts), b1c = at::zeros({D}, opts);
      const int64_t t_end = std::min(tl.tiles, (ch + 1) * tiles_per_chunk);
      for (int64_t t = ch * tiles_per_chunk; t < t_end; ++t) {
        const int64_t r0 = t * tl.rows, rows = std::min(tl.rows, M - r0);
        at::Tensor yt;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          yt = y2d.narrow(0, r0, rows);
        } else {
          yt = ybuf.narrow(0, 0, rows);
          convert(y_ptr + r0 * C, yt.data_ptr<acc_t>(), rows * C);
        }
        at::Tensor gt = gbuf.narrow(0, 0, rows), go = gobuf.narrow(0, 0, rows);
        at::Tensor h = hbuf.narrow(0, 0, rows), dg = dgbuf.narrow(0, 0, rows);
        at::Tensor dh = dhbuf.narrow(0, 0, rows), dyt = dybuf.narrow(0, 0, rows);
        acc_t *gp = gt.data_ptr<acc_t>(), *gop = go.data_ptr<acc_t>();
        convert(grad_ptr + r0 * C, gp, rows * C);
        for (int64_t r = 0; r < rows; ++r) {
          if (gamma != nullptr) {
            at::vec::map2([](Vec<acc_t> a, Vec<acc_t> b) { return a * b; }, gop + r * C,
                          gp + r * C, gamma, C);
          } else {
            std::memcpy(gop + r * C, gp + r * C, C * sizeof(acc_t));
          }
        }
        add_column_sums(sgc.data_ptr<acc_t>(), gp, rows, C);
        // Recompute the hidden and the GELU slope of the tile.
        at::mm_out(h, yt, w1t);
        bias_gelu_grad_rows(h.data_ptr<acc_t>(), dg.data_ptr<acc_t>(), b1, 0, rows, D);
        Gc.addmm_(gt.t(), h);
        at::mm_out(dh, go, p.w2);  // [rows, C] @ [C, D]
        at::vec::map2([](Vec<acc_t> a, Vec<acc_t> b) { return a * b; }, dg.data_ptr<acc_t>(),
                      dh.data_ptr<acc_t>(), dg.data_ptr<acc_t>(), rows * D);  // da
        add_column_sums(b1c.data_ptr<acc_t>(), dg.data_ptr<acc_t>(), rows, D);
        W1c.addmm_(dg.t(), yt);
        at::mm_out(dyt, dg, p.w1);  // [rows, D] @ [D, C]
        convert(dyt.data_ptr<acc_t>(), dy_ptr + r0 * C, rows * C);
      }
      parts_G[ch] = Gc;
      parts_W1[ch] = W1c;
      parts_sg[ch] = sgc;
      parts_b1[ch] = b1c;
    }
  };
  if (n_chunks > 1) {
    at::parallel_for(0, n_chunks, 1, run_chunks);
  } else {
    run_chunks(0, n_chunks);
  }
  G.copy_(parts_G[0]);
  dW1.copy_(parts_W1[0]);
  sum_grad.copy_(parts_sg[0]);
  db1.copy_(parts_b1[0]);
  for (int64_t ch = 1; ch < n_chunks; ++ch) {
    G.add_(parts_G[ch]);
    dW1.add_(parts_W1[ch]);
    sum_grad.add_(parts_sg[ch]);
    db1.add_(parts_b1[ch]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& fc1_weight,
    const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
    const std::optional<at::Tensor>& fc2_bias, const std::optional<at::Tensor>& gamma) {
  constexpr const char* op = "mlp_bwd";
  at::AutoDispatchBelowADInplaceOrView guard;
  check_mlp(op, y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma);
  TORCH_CHECK(grad_out.sizes() == y.sizes(), op, ": grad_out must have y's shape ", y.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == y.scalar_type() && grad_out.device() == y.device(), op,
              ": grad_out must have y's dtype and device");
  TORCH_CHECK(grad_out.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": grad_out must be channels_last-contiguous (NHWC memory)");
  const int64_t C = y.size(1), D = fc1_weight.size(0);
  const bool fp64 = y.scalar_type() == at::kDouble;
  const auto acc = fp64 ? at::kDouble : at::kFloat;
  const auto acc_opts = y.options().dtype(acc);
  at::Tensor dy = at::empty_like(y, at::MemoryFormat::ChannelsLast);
  at::Tensor G = at::empty({C, D}, acc_opts), dW1 = at::empty({D, C}, acc_opts);
  at::Tensor sum_grad = at::empty({C}, acc_opts), db1 = at::empty({D}, acc_opts);
  if (poison_outputs()) dy.fill_(NAN);
  const MlpParams p = compute_params(fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, acc);
  if (y.numel() == 0) {
    for (at::Tensor* t : {&G, &dW1, &sum_grad, &db1}) t->zero_();
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "mlp_bwd_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      mlp_bwd_kernel<scalar_t, acc_t>(grad_out.data_ptr<scalar_t>(), y.detach(), p,
                                      dy.data_ptr<scalar_t>(), G, dW1, sum_grad, db1);
    });
  }
  // d_fc2_weight = diag(gamma) G; d_fc2_bias = gamma * colsum(grad);
  // d_gamma[c] = sum_m grad[m, c] * (h W2^T + b2)[m, c] = sum_d W2[c, d] G[c, d] + b2[c] colsum(grad)[c].
  at::Tensor dW2 = p.gamma.defined() ? G * p.gamma.unsqueeze(1) : G;
  at::Tensor db2 = p.gamma.defined() ? sum_grad * p.gamma : sum_grad;
  at::Tensor dgamma = (p.w2 * G).sum(1);
  if (p.b2.defined()) dgamma = dgamma + p.b2 * sum_grad;
  const auto pdt = fc1_weight.scalar_type();
  return {dy, dW1.to(pdt), db1.to(pdt), dW2.to(pdt), db2.to(pdt), dgamma.to(pdt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(convnext_fast, CPU, m) {
  m.impl("mlp", &mlp_cpu);
  m.impl("mlp_bwd", &mlp_bwd_cpu);
}

}  // namespace convnext_fast

// What the C++ CPU mlp reports outside its translation unit (csrc/cpu/mlp_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <optional>

namespace convnext_fast {

// The dtype of the CPU mlp forward's GEMMs for inputs of dtype st: st itself for bf16/fp16 where
// oneDNN has them natively (or CONVNEXT_FAST_CPU_GEMM=native), else fp32 (fp64 for fp64).
c10::ScalarType mlp_cpu_gemm_dtype(c10::ScalarType st);

// Whether inference calls (eager, no gradient) of the CPU mlp with inputs of dtype st run on the
// packed-weight tiles (include/mlp_tiles.h) in this build on this CPU; bf16 also needs C and D
// even.
bool mlp_cpu_tiles(c10::ScalarType st);

// v (if given) in fp32, zero-padded to whole vectors, as the tiles' epilogues load it: made once
// per version of v (derived_cache.h); undefined for nullopt.
at::Tensor padded_vector(const std::optional<at::Tensor>& v);

}  // namespace convnext_fast

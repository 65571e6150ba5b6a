// What the C++ CPU downsample reports outside its translation unit (csrc/cpu/downsample_cpu.cpp).
#pragma once

#include <c10/core/ScalarType.h>

namespace convnext_fast {

// Whether convnext_fast::downsample runs for inputs of dtype st in this build on this CPU: fp32
// in builds for AVX2 or AVX-512, bf16 where the mlp's bf16 tiles run (AVX512-BF16 without AMX).
bool downsample_cpu_supported(c10::ScalarType st);

}  // namespace convnext_fast

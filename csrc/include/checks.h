// Input checks shared by the host functions. Each message names the argument and the expectation,
// matching the Python-side checks in convnext_fast/specs/checks.py.
#pragma once

#include <torch/types.h>

#define CNF_CHECK_SAME(op, name, t, ref)                                                          \
  TORCH_CHECK((t).device() == (ref).device(), op ": " name " is on ", (t).device(),              \
              " but x is on ", (ref).device());                                                   \
  TORCH_CHECK((t).scalar_type() == (ref).scalar_type(), op ": " name " has dtype ",              \
              (t).scalar_type(), " but x has ", (ref).scalar_type())

#define CNF_CHECK_VEC(op, name, t, ref, n)                                                        \
  TORCH_CHECK((t).dim() == 1 && (t).size(0) == (n), op ": " name " must have shape [", (n),       \
              "], got ", (t).sizes());                                                            \
  CNF_CHECK_SAME(op, name, t, ref)

#define CNF_CHECK_NHWC(op, name, t)                                                               \
  TORCH_CHECK((t).dim() == 4, op ": " name " must be 4-D [N, C, H, W], got ", (t).sizes());       \
  TORCH_CHECK((t).is_contiguous(at::MemoryFormat::ChannelsLast), op ": " name                     \
              " must be channels_last-contiguous (NHWC memory); call "                           \
              ".contiguous(memory_format=torch.channels_last)")

#include <cstdlib>
#include <cstring>

namespace convnext_fast {
// CONVNEXT_FAST_POISON_OUTPUTS=1 (set by the test suite) fills every output with NaN before a
// kernel writes it, so an element the kernel fails to write cannot pass a parity test.
inline bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("CONVNEXT_FAST_POISON_OUTPUTS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}
}  // namespace convnext_fast

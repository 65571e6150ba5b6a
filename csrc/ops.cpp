// All op schemas of the convnext_fast library, in one place. Kernels register under
// TORCH_LIBRARY_IMPL(convnext_fast, CPU|CUDA) in csrc/cpu and csrc/cuda; fake tensors and
// autograd are registered from Python (convnext_fast/ops/).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "include/derived_cache.h"
#include "include/downsample_cpu.h"
#include "include/dwconv_limits.h"
#include "include/mlp_cpu.h"

TORCH_LIBRARY(convnext_fast, m) {
  // y = LayerNorm_C(dwconv_kxk(x) + conv_bias); also returns the per-pixel fp32 mean and rstd
  // ([N, H, W]) that the backward reuses. x and y are channels_last [N, C, H, W].
  m.def(
      "dwconv_ln(Tensor x, Tensor conv_weight, Tensor? conv_bias, Tensor ln_weight, "
      "Tensor ln_bias, float eps) -> (Tensor, Tensor, Tensor)");
  // Gradients of dwconv_ln from its saved statistics (the conv output is recomputed from x):
  // returns (dx [N, C, H, W] channels_last in x's dtype, d_conv_weight [C, 1, k, k],
  // d_conv_bias [C] (always computed; the caller drops it when there is no bias), d_ln_weight [C],
  // d_ln_bias [C]), the parameter gradients in the parameters' dtype. grad_y is channels_last.
  m.def(
      "dwconv_ln_bwd(Tensor grad_y, Tensor x, Tensor conv_weight, Tensor? conv_bias, "
      "Tensor ln_weight, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // out = residual + gamma * fc2(gelu_erf(fc1(y))), per pixel over channels: y, residual and
  // out are channels_last [N, C, H, W]; fc1_weight [D, C], fc1_bias [D], fc2_weight [C, D],
  // fc2_bias, gamma [C]; the optional ones may be None (no bias, no layer scale, no residual).
  m.def(
      "mlp(Tensor y, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
      "Tensor? gamma, Tensor? residual) -> Tensor");
  // Gradients of mlp (the hidden is recomputed from y): (dy [N, C, H, W] channels_last,
  // d_fc1_weight [D, C], d_fc1_bias [D], d_fc2_weight [C, D], d_fc2_bias [C], d_gamma [C]), in the
  // parameters' dtype. Every one is always computed (the bias and gamma gradients as if the
  // parameter were there: d_gamma for gamma = 1); the caller drops those of absent arguments. The
  // residual's gradient is grad_out itself and is not an output.
  m.def(
      "mlp_bwd(Tensor grad_out, Tensor y, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, "
      "Tensor? fc2_bias, Tensor? gamma) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The ConvNeXt downsample for CPU inference (models/cpu_conv.py): conv_{s x s, stride s}(
  // LayerNorm_C(x)), x channels_last [N, C, H, W], conv_weight [C_out, C, s, s] -> channels_last
  // [N, C_out, H / s, W / s]. No autograd: callers take it only when no gradient is needed.
  m.def(
      "downsample(Tensor x, Tensor ln_weight, Tensor ln_bias, float eps, Tensor conv_weight, "
      "Tensor? conv_bias) -> Tensor");
}

#ifndef CONVNEXT_FAST_ARCH_LIST
#define CONVNEXT_FAST_ARCH_LIST ""
#endif
#ifndef CONVNEXT_FAST_TORCH_VERSION
#define CONVNEXT_FAST_TORCH_VERSION ""
#endif
#ifndef CONVNEXT_FAST_CPU_FLAGS
#define CONVNEXT_FAST_CPU_FLAGS ""
#endif

// build_info() is what `python -m convnext_fast info` prints about the build.
static PyObject* build_info(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
#ifdef CONVNEXT_FAST_WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  PyDict_SetItemString(d, "with_cuda", with_cuda);
  PyObject* arch = PyUnicode_FromString(CONVNEXT_FAST_ARCH_LIST);
  PyDict_SetItemString(d, "cuda_arch_list", arch);
  Py_DECREF(arch);
  PyObject* cpu = PyUnicode_FromString(CONVNEXT_FAST_CPU_FLAGS);
  PyDict_SetItemString(d, "cpu_flags", cpu);
  Py_DECREF(cpu);
  PyObject* torch_version = PyUnicode_FromString(CONVNEXT_FAST_TORCH_VERSION);
  PyDict_SetItemString(d, "torch_version", torch_version);
  Py_DECREF(torch_version);
  return d;
}

// cpu_gemm_dtypes(): {"bfloat16": ..., "float16": ...}, the dtype the CPU mlp forward's GEMMs run
// in for inputs of that dtype (what `python -m convnext_fast info` shows).
static PyObject* cpu_gemm_dtypes(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  try {
    for (const auto st : {c10::ScalarType::BFloat16, c10::ScalarType::Half}) {
      const auto gemm = convnext_fast::mlp_cpu_gemm_dtype(st);
      PyObject* v = PyUnicode_FromString(gemm == c10::ScalarType::BFloat16 ? "bfloat16"
                                         : gemm == c10::ScalarType::Half   ? "float16"
                                                                           : "float32");
      PyDict_SetItemString(d, st == c10::ScalarType::BFloat16 ? "bfloat16" : "float16", v);
      Py_DECREF(v);
    }
  } catch (const c10::Error& e) {
    Py_DECREF(d);
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
  return d;
}

// cpu_mlp_tiles(): {"float32": bool, "bfloat16": bool}, whether the CPU mlp's inference calls of
// that dtype run on the packed-weight tiles here (what `python -m convnext_fast info` shows).
static PyObject* cpu_mlp_tiles(PyObject*, PyObject*) {
  return Py_BuildValue("{s:O,s:O}", "float32",
                       convnext_fast::mlp_cpu_tiles(c10::ScalarType::Float) ? Py_True : Py_False,
                       "bfloat16",
                       convnext_fast::mlp_cpu_tiles(c10::ScalarType::BFloat16) ? Py_True : Py_False);
}

// cpu_downsample(): {"float32": bool, "bfloat16": bool}, whether convnext_fast::downsample runs
// for that dtype here.
static PyObject* cpu_downsample(PyObject*, PyObject*) {
  using convnext_fast::downsample_cpu_supported;
  return Py_BuildValue("{s:O,s:O}", "float32",
                       downsample_cpu_supported(c10::ScalarType::Float) ? Py_True : Py_False,
                       "bfloat16",
                       downsample_cpu_supported(c10::ScalarType::BFloat16) ? Py_True : Py_False);
}

// cuda_limits(): the CUDA dwconv_ln kernels' limits, for the cuda backend's support rule.
static PyObject* cuda_limits(PyObject*, PyObject*) {
  using namespace convnext_fast;
  PyObject* sizes = PyTuple_New(sizeof(kCudaKernelSizes) / sizeof(int));
  for (size_t i = 0; i < sizeof(kCudaKernelSizes) / sizeof(int); ++i)
    PyTuple_SET_ITEM(sizes, i, PyLong_FromLong(kCudaKernelSizes[i]));
  // max_shared_bytes: the most dynamic shared memory any kernel asks for, whatever C (the cuda
  // backend checks it against the GPU's opt-in limit; backends/_cpp.py cuda_shared_bytes).
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:N}", "max_c", (long long)kMaxC, "tile_w",
                       (long long)kTileW, "bwd_static_shared_bytes",
                       (long long)kBwdStaticSharedBytes, "max_shared_bytes",
                       (long long)kSharedBudget, "max_grid_yz", (long long)kMaxGridYZ,
                       "kernel_sizes", sizes);
}

// clear_cache(): forget the weights derived once per version (include/derived_cache.h).
static PyObject* clear_cache(PyObject*, PyObject*) {
  convnext_fast::derived_cache().clear();
  Py_RETURN_NONE;
}

// set_cache_enabled(on) -> the previous setting, for the calling thread (derived_cache.h).
static PyObject* set_cache_enabled(PyObject*, PyObject* on) {
  const bool was = convnext_fast::DerivedCache::set_enabled(PyObject_IsTrue(on) == 1);
  return PyBool_FromLong(was);
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "Facts recorded when the extension was built."},
    {"cuda_limits", cuda_limits, METH_NOARGS, "The CUDA dwconv_ln kernels' limits."},
    {"clear_cache", clear_cache, METH_NOARGS, "Forget the weights derived once per version."},
    {"set_cache_enabled", set_cache_enabled, METH_O,
     "Turn the derived-weight cache on or off for this thread; returns the previous setting."},
    {"cpu_gemm_dtypes", cpu_gemm_dtypes, METH_NOARGS,
     "The dtype of the CPU mlp forward's GEMMs for bf16 and fp16 inputs."},
    {"cpu_mlp_tiles", cpu_mlp_tiles, METH_NOARGS,
     "Whether the CPU mlp's inference calls run on the packed-weight tiles, per dtype."},
    {"cpu_downsample", cpu_downsample, METH_NOARGS,
     "Whether convnext_fast::downsample has a CPU kernel here, per dtype."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

// Importing convnext_fast._C loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }

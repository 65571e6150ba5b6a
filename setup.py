"""Builds convnext_fast and its extension convnext_fast._C.

    pip install -e . --no-build-isolation     # against the torch already installed

The extension always has the C++ CPU kernels (csrc/ops.cpp, csrc/cpu/). The CUDA kernels
(csrc/cuda/*.cu) are added when torch is a CUDA build and a CUDA toolkit is found, unless
CONVNEXT_FAST_SKIP_CUDA_BUILD=1. TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" when no GPU is
visible (with a GPU, torch builds for the visible one). CONVNEXT_FAST_SKIP_EXT_BUILD=1 installs
the pure-Python package only.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    # torch.utils.cpp_extension reads CUDA_HOME at import; its own guess can land on a prefix
    # without the toolkit's libraries (e.g. /usr/local), so settle it first.
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            return os.environ[env]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")  # may be a wrapper script outside the toolkit: check the prefix
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for prefix in candidates:
        if os.path.exists(os.path.join(prefix, "bin", "nvcc")) and \
                os.path.exists(os.path.join(prefix, "include", "cuda_runtime.h")):
            return prefix
    return None


def _pip_cuda_includes(cuda_home):
    """Headers of the pip-installed CUDA libraries (nvidia/*/include) that a toolkit-only
    CUDA_HOME lacks: ATen's CUDA headers include cusparse.h, cublas_v2.h, ..."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    return dirs


def _cpu_flags():
    """-m flags for the build machine's vector ISA; the extension is built where it runs."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().split()
    except OSError:
        return [], ""
    if all(f in info for f in ("avx2", "fma", "f16c")):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"], "avx2"
    return [], "default"


def _extensions():
    if os.environ.get("CONVNEXT_FAST_SKIP_EXT_BUILD") == "1":
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu_flags, cpu_name = _cpu_flags()
    sources = sorted(glob.glob("csrc/ops.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = (
        os.environ.get("CONVNEXT_FAST_SKIP_CUDA_BUILD") != "1"
        and torch.version.cuda is not None
        and cuda_home is not None
        and bool(cuda_sources)
    )
    arch_list = ""
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPU")
    macros = [
        ("CONVNEXT_FAST_TORCH_VERSION", f'"{torch.__version__}"'),
        ("CONVNEXT_FAST_CPU_FLAGS", f'"{cpu_name}"'),
        ("CONVNEXT_FAST_ARCH_LIST", f'"{arch_list}"'),
    ]
    # at::parallel_for is inline: without -fopenmp here the kernels would run on one thread.
    # The C++ standard is left to torch.utils.cpp_extension (C++20 from torch 2.10 on).
    cxx = ["-O3", "-fopenmp", *cpu_flags]
    # Some toolchains link libstdc++ statically (seen with the GPU machine's /opt/gcc g++): keep its
    # symbols private, or they interpose on the process's libstdc++ and std::ostream crashes.
    link = ["-fopenmp", "-Wl,--exclude-libs,ALL"]
    if with_cuda:
        macros.append(("CONVNEXT_FAST_WITH_CUDA", None))
        ext = CUDAExtension(
            "convnext_fast._C",
            sources + cuda_sources,
            include_dirs=_pip_cuda_includes(cuda_home),
            define_macros=macros,
            extra_compile_args={
                "cxx": cxx,
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                         "--expt-relaxed-constexpr"],
            },
            extra_link_args=link,
        )
    else:
        ext = CppExtension("convnext_fast._C", sources, define_macros=macros,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="convnext_fast",
    version="0.1.0",
    description="ConvNeXt V1/V2 with fused dwconv+LayerNorm and MLP kernels (Triton, CUDA, C++)",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["convnext_fast", "convnext_fast.*"]),
    package_data={"convnext_fast.backends": ["backend_order.json"]},
    install_requires=["torch>=2.6", "safetensors"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "timm>=1.0.15"],
        "bench": ["timm>=1.0.15", "rich", "matplotlib", "pytest-benchmark"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)

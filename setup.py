"""Builds the optional CUDA extension `moshi_fast._C` from csrc/.

The extension is built only when a CUDA-enabled torch and nvcc are both present (and csrc/ holds
sources); everywhere else `pip install .` installs the pure-Python package, which imports and runs
without it. Set MOSHI_FAST_SKIP_CUDA_BUILD=1 to skip the build on a CUDA machine. The compiler flags
(and so the GPU architectures) are moshi_fast/cuda_ext.py's, which its JIT build uses too.
"""
import glob
import importlib.util
import os
import shutil

from setuptools import setup


def _build_flags() -> tuple[list[str], list[str]]:
    """(C++ flags, nvcc flags) from moshi_fast/cuda_ext.py, read without importing the package."""
    spec = importlib.util.spec_from_file_location("_moshi_fast_cuda_ext", "moshi_fast/cuda_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CXX_FLAGS, module.NVCC_FLAGS


def _cuda_extension():
    if os.environ.get("MOSHI_FAST_SKIP_CUDA_BUILD") == "1":
        return None
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources:
        return None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None
    if torch.version.cuda is None or CUDA_HOME is None or shutil.which("nvcc") is None:
        return None
    cxx_flags, nvcc_flags = _build_flags()
    extension = CUDAExtension(name="moshi_fast._C", sources=sources,
                              extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags})
    return extension, BuildExtension


built = _cuda_extension()
if built is None:
    setup()
else:
    extension, build_ext = built
    setup(ext_modules=[extension], cmdclass={"build_ext": build_ext})

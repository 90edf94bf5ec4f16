"""Builds the optional CUDA extension `moshi_fast._C` from csrc/.

The extension is built only when a CUDA-enabled torch and nvcc are both present (and csrc/ holds
sources); everywhere else `pip install .` installs the pure-Python package, which imports and runs
without it. Set MOSHI_FAST_SKIP_CUDA_BUILD=1 to skip the build on a CUDA machine.
"""
import glob
import os
import shutil

from setuptools import setup


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
    extension = CUDAExtension(
        name="moshi_fast._C",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "--threads", "4",
                     "-gencode", "arch=compute_90,code=sm_90"],
        },
    )
    return extension, BuildExtension


built = _cuda_extension()
if built is None:
    setup()
else:
    extension, build_ext = built
    setup(ext_modules=[extension], cmdclass={"build_ext": build_ext})

"""Builds xorgemm's native extensions.

xorgemm._C       C++ (always): tile codecs, delta sections, the xorgemm op schemas and their CPU kernels.
xorgemm._C_cuda  CUDA (when nvcc and a CUDA build of torch are present): the ops' CUDA kernels over the same
                 shared codec headers. XORGEMM_FORCE_CPU=1 skips it; TORCH_CUDA_ARCH_LIST picks the targets
                 (default "8.0+PTX;9.0a": cubins for sm_80 and sm_90a, PTX for newer GPUs to JIT).
"""
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup


def _find_cuda_home():
    """CUDA_HOME is the folder above nvcc's bin/. nvcc may be a wrapper script on the PATH, so ask nvcc
    itself (its dry run prints TOP=<bin>/..); torch reads CUDA_HOME when cpp_extension is imported."""
    if os.environ.get("CUDA_HOME") or os.environ.get("XORGEMM_FORCE_CPU", "0") == "1" or not shutil.which("nvcc"):
        return
    try:
        out = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return
    for line in out.splitlines():
        if line.startswith("#$ TOP="):
            os.environ["CUDA_HOME"] = os.path.realpath(line.split("=", 1)[1].strip())
            return


_find_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME  # noqa: E402

ROOT = Path(__file__).parent
CSRC = "csrc"


def _cuda_include_dirs():
    """torch's CUDA headers include cusparse.h/cublas_v2.h, which CUDA 13 wheels ship in nvidia/cu13/include."""
    dirs = []
    try:
        import nvidia

        for base in nvidia.__path__:
            for sub in ("cu13/include", "cu12/include"):
                if (Path(base) / sub).is_dir():
                    dirs.append(str(Path(base) / sub))
    except ImportError:
        pass
    return dirs


def _want_cuda():
    if os.environ.get("XORGEMM_FORCE_CPU", "0") == "1":
        return False
    return (torch.version.cuda is not None and CUDA_HOME is not None
            and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))


cxx_flags = ["-O3", "-std=c++20"]
ext_modules = [
    CppExtension(
        "xorgemm._C",
        sources=[f"{CSRC}/python/module.cpp", f"{CSRC}/ops.cpp", f"{CSRC}/cpu/xor_linear_cpu.cpp",
                 f"{CSRC}/cpu/fused_linear.cpp", f"{CSRC}/format/delta_section.cpp"],
        include_dirs=[str(ROOT / CSRC)],
        extra_compile_args={"cxx": cxx_flags},
    )
]

if _want_cuda():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
    ext_modules.append(
        CUDAExtension(
            "xorgemm._C_cuda",
            sources=[f"{CSRC}/cuda/xor_linear_cuda.cpp", f"{CSRC}/cuda/apply_section.cu",
                     f"{CSRC}/cuda/fused_gemm.cu", f"{CSRC}/cuda/device_errors.cpp"],
            include_dirs=[str(ROOT / CSRC)] + _cuda_include_dirs(),
            extra_compile_args={
                "cxx": cxx_flags,
                # -Xptxas -v prints registers and spills per kernel; the build log is checked by a test.
                "nvcc": ["-O3", "-std=c++20", "-lineinfo", "-Xptxas=-v"],
            },
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})

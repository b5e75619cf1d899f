"""The CUDA extension builds for sm_80 and sm_90a wherever nvcc and a CUDA build of torch are present, its hot
kernels without register spills (no local memory, no stack: what `ptxas -v` reports, read back from the
cubins) and the fused GEMMs on tensor cores (HMMA in their SASS). CI sets XORGEMM_REQUIRE_CUDA_BUILD=1, so
there these tests never skip."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from xorgemm._native import CUDA

REQUIRED = os.environ.get("XORGEMM_REQUIRE_CUDA_BUILD") == "1"


def cuobjdump():
    try:
        import nvidia

        for base in nvidia.__path__:
            exe = Path(base) / "cu13" / "bin" / "cuobjdump"
            if exe.is_file():
                return str(exe)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def run_tool(tool, *args):
    # cuobjdump -sass runs nvdisasm, which the nvidia-cuda-nvdisasm wheel puts beside it.
    env = dict(os.environ, PATH=str(Path(tool).parent) + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True, env=env).stdout


def cuda_so():
    if CUDA is None:
        if REQUIRED:
            pytest.fail("XORGEMM_REQUIRE_CUDA_BUILD=1 but xorgemm._C_cuda was not built")
        pytest.skip("xorgemm was built without CUDA (no nvcc or a CPU build of torch)")
    tool = cuobjdump()
    if tool is None:
        if REQUIRED:
            pytest.fail("cuobjdump not found: pip install nvidia-cuda-cuobjdump")
        pytest.skip("cuobjdump not installed")
    return tool, CUDA.__file__


def test_cuda_extension_has_sm80_and_sm90a_cubins_and_ptx():
    tool, so = cuda_so()
    elves = run_tool(tool, "-lelf", so)
    for unit in ("apply_section", "fused_gemm"):
        for arch in ("sm_80", "sm_90a"):
            assert re.search(rf"{unit}\.{arch}\.cubin", elves), elves
    # PTX too, so GPUs newer than sm_90 compile the kernels at load instead of finding no kernel image.
    ptx = run_tool(tool, "-lptx", so)
    for unit in ("apply_section", "fused_gemm"):
        assert re.search(rf"{unit}\.sm_80\.ptx", ptx), ptx


HOT_KERNELS = {
    "apply_section_kernel": 8,  # 4 word sizes x 2 architectures
    "fused_xor_gemm_kernel": 24,  # bf16/fp16 x 3 row tiles x forward/backward x 2 architectures
}


def test_kernels_do_not_spill():
    tool, so = cuda_so()
    usage = run_tool(tool, "-res-usage", so)
    kernels = re.findall(r"Function (\S+):\n\s+REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    for family, count in HOT_KERNELS.items():
        found = [k for k in kernels if family in k[0]]
        assert len(found) == count, f"{family}: expected {count} kernels, found {len(found)}\n{usage}"
        for name, reg, stack, local in found:
            assert int(local) == 0 and int(stack) == 0, f"{name} spills: {reg} registers, stack {stack}, local {local}"


def test_fused_kernels_run_on_tensor_cores():
    tool, so = cuda_so()
    sass = run_tool(tool, "-sass", so)
    # One "Function : <name>" header per kernel and architecture, its SASS up to the next header.
    bodies = re.split(r"\n\s+Function : ", sass)[1:]
    fused = [b for b in bodies if "fused_xor_gemm_kernel" in b.split("\n", 1)[0]]
    assert len(fused) == HOT_KERNELS["fused_xor_gemm_kernel"], f"found {len(fused)} fused kernels in the SASS"
    for body in fused:
        name = body.split("\n", 1)[0]
        bf16 = "ILb1E" in name  # the template's first argument: bf16 (true) or fp16 (false)
        mma = re.findall(r"HMMA\.16816\.F32(\.BF16)?\b", body)
        assert mma, f"{name}: no HMMA.16816 in its SASS"
        assert all(bool(m) == bf16 for m in mma), f"{name}: HMMA of the wrong input type"

"""bench/perf_model.py: the performance model the GPU benchmarks print beside their measurements."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import perf_model  # noqa: E402


def test_plan_mirrors_the_kernels_plan_launch():
    """The same splits as csrc/cuda/fused_gemm_kernel.cuh's plan_launch (kernel_emulation_test checks these
    numbers on the C++ side), and never a function of M."""
    assert perf_model.plan(16, 4096, 4096, 132).splits == 6
    assert perf_model.plan(1, 14336, 4096, 132).splits == 5
    assert perf_model.plan(1, 4096, 14336, 132).splits == 6
    for shape in [(4096, 4096), (14336, 4096), (4096, 14336), (128, 520), (64, 0)]:
        splits = {perf_model.plan(m, *shape, 132).splits for m in (1, 16, 33, 64, 2048)}
        assert len(splits) == 1, shape
    assert perf_model.plan(5, 128, 0, 132).splits == 1  # K = 0
    prefill = perf_model.plan(8192, 14336, 4096, 132)
    assert (prefill.splits, prefill.grid_splits) == (5, 1)
    assert perf_model.plan(16, 14336, 4096, 132).grid_splits == 5


@pytest.mark.parametrize("device", sorted(perf_model.DEVICES))
def test_predictions_respect_the_byte_floor(device):
    """No prediction is faster than moving its bytes at copy bandwidth, and every one names its bound."""
    dev = perf_model.DEVICES[device]
    for n, k in perf_model.DEVICE_SCRIPT_SHAPES:
        for m in perf_model.DEVICE_SCRIPT_MS:
            for frac in (0.0, 0.06, 0.54):
                p = perf_model.xor_linear(n, k, m, frac, dev)
                floor_ms = n * k * 2 * (1 + frac) / (dev.copy_gbs * 1e9) * 1e3
                assert p.ms >= floor_ms and p.bound and p.detail
                assert perf_model.cublas(n, k, m, dev).ms >= n * k * 2 / (dev.copy_gbs * 1e9) * 1e3
        g = perf_model.grouped(n, k, 16, 16, 0.06, dev)
        assert g.ms >= n * k * 2 * (1 + 16 * 0.06) / (dev.copy_gbs * 1e9) * 1e3


def test_the_dry_run_prints_every_device_script_row(capsys):
    perf_model.main(["--device", "h200"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 4096x") or line.startswith("| 14336x")]
    per_shape = len(perf_model.DEVICE_SCRIPT_MS) * 2
    assert len(rows) == per_shape * len(perf_model.DEVICE_SCRIPT_SHAPES) + 4

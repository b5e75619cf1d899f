"""GPU tests of the grouped (multi-fine-tune) path: one launch for a batch whose rows use different
fine-tunes. Against the CPU op and the per-fine-tune dense references, on every row distribution of the
multi-tenant benchmark, with D up to 64 (the most one launch takes) and beyond (the patched-block path).
They run where a GPU and the CUDA kernels exist and skip cleanly elsewhere."""
import pytest
import torch
from helpers import rel_err

import xorgemm
from xorgemm import XorLinear
from xorgemm._native import has_kernel
from xorgemm.testing import DELTA_KINDS, ROW_DISTRIBUTIONS, perturb, row_finetunes

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or not has_kernel("cuda"),
                                 reason="needs a CUDA GPU and the op's CUDA kernel")]


def bank(d, n=520, k=264, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    fts = [perturb(base, DELTA_KINDS[i % 4], seed=i, magnitude=1e-2) for i in range(d)]
    gpu, cpu = XorLinear(base.cuda()), XorLinear(base)
    for i, f in enumerate(fts):
        gpu.add_finetune(f"f{i}", f.cuda())
        cpu.add_finetune(f"f{i}", f)
    return base, fts, gpu, cpu


@pytest.mark.parametrize("dist", ROW_DISTRIBUTIONS)
@pytest.mark.parametrize("d", [1, 4, 16, 64])
@pytest.mark.parametrize("m_of", ["d", "4d", "256"])
def test_grouped_matches_cpu_and_dense(dist, d, m_of):
    base, fts, gpu, cpu = bank(d)
    m = {"d": d, "4d": 4 * d, "256": 256}[m_of]
    ids = row_finetunes(dist, m, d, seed=m)
    x = (torch.randn(m, base.shape[1]) * 0.5).to(base.dtype)
    y = gpu(x.cuda(), finetune=ids.cuda())
    y_cpu = cpu(x, finetune=ids)
    assert rel_err(y, y_cpu.double()) < 1e-2
    for f in range(d):
        rows = (ids == f).nonzero().reshape(-1)
        if len(rows):
            assert rel_err(y[rows.cuda()], x[rows].double() @ fts[f].double().T) < 1e-2


def test_base_rows_a_finetune_without_rows_and_one_launch_for_all():
    base, fts, gpu, _ = bank(5)
    ids = torch.tensor([-1, 0, 0, 3, -1, 1, 3, 3])  # fine-tunes 2 and 4 have no rows
    x = torch.randn(8, base.shape[1]).to(base.dtype)
    y = gpu(x.cuda(), finetune=ids.cuda())
    weights = [base] + fts
    for r in range(8):
        assert rel_err(y[r], x[r].double() @ weights[ids[r] + 1].double().T) < 1e-2
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        gpu(x.cuda(), finetune=ids.cuda())
        torch.cuda.synchronize()
    fused = [e for e in prof.events() if "fused_xor_gemm_kernel" in e.name]
    assert len(fused) == 1, [e.name for e in prof.events()]


def test_more_finetunes_than_one_launch_takes():
    base, fts, gpu, _ = bank(70, n=136, k=200)
    ids = torch.arange(70)
    x = torch.randn(70, 200).to(base.dtype)
    y = gpu(x.cuda(), finetune=ids.cuda())  # over 64: the patched-block path
    for r in (0, 63, 64, 69):
        assert rel_err(y[r], x[r].double() @ fts[r].double().T) < 1e-2


def test_bank_on_the_gpu(tmp_path):
    """add_finetune / remove_finetune on a model on the GPU keep everything there and serve exactly."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).bfloat16()
    paths = {}
    for i in range(3):
        ft = {k: perturb(v, "dense", seed=i, magnitude=1e-2) for k, v in base.state_dict().items()}
        paths[f"f{i}"] = tmp_path / f"f{i}.xor.safetensors"
        xorgemm.pack(base.state_dict(), ft, paths[f"f{i}"])
    model = xorgemm.patch_model(base, {"f0": paths["f0"]}, device="cuda")
    xorgemm.add_finetune(model, "f1", paths["f1"])
    xorgemm.add_finetune(model, "f2", paths["f2"])
    rep = xorgemm.memory_report(model)
    assert rep.device.startswith("cuda") and set(rep.finetune_bytes) == {"f0", "f1", "f2"}
    assert rep.more_that_fit is not None and rep.more_that_fit > 100
    assert all(t.is_cuda for t in model.state_dict().values())
    xorgemm.remove_finetune(model, "f1")
    assert xorgemm.memory_report(model).finetune_bytes.keys() == {"f0", "f2"}
    x = torch.randn(4, 128).bfloat16().cuda()
    with torch.no_grad(), xorgemm.use(model, torch.tensor([0, 1, -1, 1])):
        y = model(x)
    assert torch.isfinite(y).all()

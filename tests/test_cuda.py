"""GPU tests: run on a machine with a CUDA GPU (the device script), skipped cleanly elsewhere."""
import pytest
import torch

import xorgemm
from xorgemm._native import CUDA
from xorgemm.testing import DELTA_KINDS, perturb

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or CUDA is None, reason="needs a CUDA GPU and _C_cuda")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", DELTA_KINDS)
@pytest.mark.parametrize("shape", [(256, 192), (130, 70), (1, 1), (300,), (8, 3, 5, 5)])
def test_gpu_apply_matches_cpu(tmp_path, dtype, kind, shape):
    base = torch.randn(shape).to(dtype)
    ft = perturb(base, kind, seed=3)
    path = tmp_path / "d.xor.safetensors"
    xorgemm.pack({"w": base}, {"w": ft}, path)
    d = xorgemm.load_delta(path)
    cpu = d["w"].apply(base)
    gpu = d["w"].apply(base.cuda())
    assert gpu.is_cuda
    assert torch.equal(gpu.cpu().reshape(-1).view(torch.uint8), cpu.reshape(-1).view(torch.uint8))
    assert torch.equal(cpu.reshape(-1).view(torch.uint8), ft.reshape(-1).view(torch.uint8))


def test_gpu_apply_large_tiles_and_wrong_base(tmp_path):
    base = torch.randn(300, 300).bfloat16()
    ft = perturb(base, "dense", seed=4)
    path = tmp_path / "d.xor.safetensors"
    xorgemm.pack({"w": base}, {"w": ft}, path, tile=(128, 256))
    d = xorgemm.load_delta(path)
    assert torch.equal(d["w"].apply(base.cuda()).cpu(), ft)
    with pytest.raises(xorgemm.BaseMismatchError):
        d["w"].apply(ft.cuda())

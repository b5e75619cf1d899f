"""GPU tests: run on a machine with a CUDA GPU (the device script), skipped cleanly elsewhere."""
import pytest
import torch
from helpers import payload_range

import xorgemm
from xorgemm._native import CUDA
from xorgemm.resident import resident_section
from xorgemm.testing import DELTA_KINDS, perturb

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or CUDA is None, reason="needs a CUDA GPU and _C_cuda")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", DELTA_KINDS)
@pytest.mark.parametrize("shape", [(256, 192), (130, 70), (1, 1), (300,), (8, 3, 5, 5)],
                         ids=lambda s: "x".join(map(str, s)))
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


@pytest.mark.skipif(not xorgemm.resident.nvcomp_available(), reason="needs nvCOMP (xorgemm[cuda])")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nvcomp_and_zstandard_give_the_same_resident_tiles(tmp_path, monkeypatch, dtype):
    """The zstd chunks decompressed on the GPU by nvCOMP and on the CPU by zstandard: identical sections
    and tile offsets, and a layer loaded either way computes the same output bit for bit."""
    g = torch.Generator().manual_seed(9)
    base = {"a": torch.randn(1000, 776, generator=g).to(dtype), "b": torch.randn(300, 64, generator=g).to(dtype)}
    ft = {"a": perturb(base["a"], "dense", seed=1), "b": perturb(base["b"], "sparse", seed=2)}
    path = tmp_path / "d.xor.safetensors"
    xorgemm.pack(base, ft, path, chunk_bytes=16 * 1024)  # several chunks per tensor, spans across chunk edges
    d = xorgemm.load_delta(path)
    for name in base:
        monkeypatch.setenv("XORGEMM_DECOMPRESS", "nvcomp")
        sec_gpu, off_gpu = resident_section(d[name], "cuda")
        monkeypatch.setenv("XORGEMM_DECOMPRESS", "cpu")
        sec_cpu, off_cpu = resident_section(d[name], "cuda")
        assert sec_gpu.is_cuda and sec_cpu.is_cuda
        assert torch.equal(sec_gpu, sec_cpu) and torch.equal(off_gpu, off_cpu)
        assert torch.equal(sec_gpu.cpu(), d[name].section()[0])
    layers = {}
    for how in ("nvcomp", "cpu"):
        monkeypatch.setenv("XORGEMM_DECOMPRESS", how)
        layer = xorgemm.XorLinear(base["a"].cuda())
        layer.add_finetune_from_file("ft", d["a"])
        layers[how] = layer
    x = torch.randn(5, 776, generator=g).to(dtype).cuda()
    assert torch.equal(layers["nvcomp"](x, finetune="ft"), layers["cpu"](x, finetune="ft"))


@pytest.mark.skipif(not xorgemm.resident.nvcomp_available(), reason="needs nvCOMP (xorgemm[cuda])")
def test_nvcomp_reports_a_corrupted_chunk(tmp_path, monkeypatch):
    base = torch.randn(256, 256).bfloat16()
    path = tmp_path / "d.xor.safetensors"
    xorgemm.pack({"w": base}, {"w": perturb(base, "dense", seed=1)}, path)
    payload_at = payload_range(path)[0] + 1  # inside the first chunk's zstd magic number: no valid frame
    raw = bytearray(path.read_bytes())
    raw[payload_at] ^= 0xFF
    bad = tmp_path / "bad.xor.safetensors"
    bad.write_bytes(bytes(raw))
    monkeypatch.setenv("XORGEMM_DECOMPRESS", "nvcomp")
    with pytest.raises(xorgemm.DeltaFormatError) as e:
        resident_section(xorgemm.load_delta(bad)["w"], "cuda")
    assert "bad.xor.safetensors" in str(e.value)

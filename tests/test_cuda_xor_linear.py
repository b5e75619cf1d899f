"""GPU tests of the xor_linear op, ready for the fused CUDA kernel: they run where a GPU and the op's CUDA
kernel exist and skip cleanly elsewhere. Fresh random inputs (never zeros), outputs poisoned first, every
dtype, many M, ragged N/K, every delta kind; the CUDA op against the CPU op and against F.linear on the
reconstructed weight in float64 (normwise: bf16/fp16 < 1e-2; fp32 < 1e-5, TF32 off as torch's default is:
fp32 weights take cuBLAS SGEMM on patched blocks)."""
import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

import xorgemm
from xorgemm import XorLinear
from xorgemm._native import has_kernel
from xorgemm.testing import DELTA_KINDS, perturb

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or not has_kernel("cuda"),
                                 reason="needs a CUDA GPU and the op's CUDA kernel")]

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def poison(nbytes: int):
    """Fill memory the caching allocator will hand out next with NaNs: an output element the kernels fail
    to write then shows up as NaN instead of a stale correct value."""
    junk = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")
    del junk


DTYPE_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@functools.lru_cache(maxsize=4)
def layers(dtype, kind, n, k):
    """Base, fine-tune, bias and the layer on the CPU and on the GPU: encoded once per weight, not per M
    (encoding 4096x4096 twice for each of 7 M was most of this file's time)."""
    g = torch.Generator().manual_seed(n * 31 + k * 7)
    base = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    ft = perturb(base, kind, seed=n + k, magnitude=1e-3)
    bias = torch.randn(n, generator=g).to(dtype)
    cpu = XorLinear(base, bias)
    cpu.add_finetune("ft", ft)
    gpu = XorLinear(base.cuda(), bias.cuda())
    gpu.add_finetune("ft", ft.cuda())
    return base, ft, bias, cpu, gpu


@pytest.mark.parametrize("m", [1, 2, 7, 16, 33, 128, 1024], ids=lambda m: f"m{m}")  # fastest: one weight, every M
@pytest.mark.parametrize("nk", [(4096, 4096), (1000, 776), (130, 70)], ids=lambda nk: f"{nk[0]}x{nk[1]}")
@pytest.mark.parametrize("kind", DELTA_KINDS)
@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=DTYPE_IDS.get)
def test_forward_against_cpu_and_float64(dtype, kind, nk, m):
    n, k = nk
    base, ft, bias, cpu, gpu = layers(dtype, kind, n, k)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(dtype)
    xd = x.cuda()
    poison(m * n * 4 * 8)  # the output and the split-K workspace
    y = gpu(xd, finetune="ft")
    y_cpu = cpu(x, finetune="ft")
    want = F.linear(x.double(), ft.double(), bias.double())
    assert rel_err(y, want) < TOL[dtype]
    assert rel_err(y, y_cpu.double()) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_mixed_rows_and_backward(dtype):
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(512, 384, generator=g) * 0.02).to(dtype)
    fts = [perturb(base, k, seed=i, magnitude=1e-3) for i, k in enumerate(("sparse", "dense", "structured"))]
    gpu = XorLinear(base.cuda())
    for i, f in enumerate(fts):
        gpu.add_finetune(f"f{i}", f.cuda())
    ids = torch.randint(-1, 3, (48,), generator=g)
    x = torch.randn(48, 384, generator=g).to(dtype).cuda().requires_grad_(True)
    poison(48 * 512 * 4 * 8)
    y = gpu(x, finetune=ids.cuda())
    gy = torch.randn(48, 512, generator=g).to(dtype)
    y.backward(gy.cuda())
    weights = [base] + fts
    for r in range(48):
        w = weights[ids[r] + 1].double()
        assert rel_err(y[r], x[r].detach().double().cpu() @ w.T) < TOL[dtype]
        assert rel_err(x.grad[r], gy[r].double() @ w) < TOL[dtype]


def test_output_is_fully_written():
    """Poison the caching allocator's memory first: every element of y must be overwritten."""
    poison = torch.full((1 << 22,), float("nan"), device="cuda")
    del poison
    base = torch.randn(300, 200).bfloat16()
    layer = XorLinear(base.cuda())
    layer.add_finetune("ft", perturb(base, "sparse").cuda())
    y = layer(torch.randn(37, 200).bfloat16().cuda(), finetune="ft")
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("path", ["fused", "blocks"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("m", [1, 33, 200], ids=lambda m: f"m{m}")
def test_both_paths_forward_and_backward(monkeypatch, path, dtype, m):
    """Each CUDA path forced in turn (XORGEMM_CUDA_PATH): forward and input gradient against float64."""
    monkeypatch.setenv("XORGEMM_CUDA_PATH", path)
    g = torch.Generator().manual_seed(m)
    base = (torch.randn(320, 200, generator=g) * 0.05).to(dtype)
    ft = perturb(base, "dense", seed=1, magnitude=1e-2)
    bias = torch.randn(320, generator=g).to(dtype)
    layer = XorLinear(base.cuda(), bias.cuda())
    layer.add_finetune("ft", ft.cuda())
    x = torch.randn(2, m, 200, generator=g).to(dtype)
    xd = x.cuda().requires_grad_(True)
    poison(2 * m * 320 * 4 * 8)
    y = layer(xd, finetune="ft")
    gy = torch.randn(2, m, 320, generator=g).to(dtype)
    y.backward(gy.cuda())
    assert rel_err(y, F.linear(x.double(), ft.double(), bias.double())) < TOL[dtype]
    assert rel_err(xd.grad, gy.double() @ ft.double()) < TOL[dtype]


@pytest.mark.parametrize("path", ["fused", "blocks"])
def test_small_paths(monkeypatch, path):
    """The small case compute-sanitizer runs (device script): ragged N, grouped rows, zero and dense tiles."""
    monkeypatch.setenv("XORGEMM_CUDA_PATH", path)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(136, 200, generator=g).bfloat16()
    fts = [perturb(base, "structured", seed=1), perturb(base, "dense", seed=2)]
    layer = XorLinear(base.cuda())
    for i, f in enumerate(fts):
        layer.add_finetune(f"f{i}", f.cuda())
    ids = torch.tensor([1, -1, 0, 1, 1, 0, -1])
    x = torch.randn(7, 200, generator=g).bfloat16()
    y = layer(x.cuda(), finetune=ids.cuda())
    weights = [base] + fts
    for r in range(7):
        assert rel_err(y[r], x[r].double() @ weights[ids[r] + 1].double().T) < 1e-2


def test_bad_inputs_are_clear_errors(monkeypatch):
    """The CUDA op's argument checks: every one names what is wrong, none reaches a kernel."""
    base = torch.randn(128, 64).bfloat16()
    layer = XorLinear(base.cuda())
    layer.add_finetune("ft", perturb(base, "dense").cuda())
    slot = layer.deltas["ft"]
    x = torch.randn(3, 64).bfloat16().cuda()
    op = torch.ops.xorgemm.xor_linear
    with pytest.raises(xorgemm.InputError, match="input is on cpu"):
        layer(x.cpu(), finetune="ft")
    with pytest.raises(RuntimeError, match="xorgemm: x is Float but the weight is BFloat16"):
        op(x.float(), layer.base_weight, [slot.section], [slot.offsets], None, None, 64, 64)
    with pytest.raises(RuntimeError, match="section 0 must be"):
        op(x, layer.base_weight, [slot.section.cpu()], [slot.offsets], None, None, 64, 64)
    with pytest.raises(RuntimeError, match="one int64 per tile"):
        op(x, layer.base_weight, [slot.section], [slot.offsets[:-1]], None, None, 64, 64)
    with pytest.raises(RuntimeError, match="row_finetune must be an int64 tensor on"):
        op(x, layer.base_weight, [slot.section], [slot.offsets], torch.zeros(3, dtype=torch.long), None, 64, 64)
    with pytest.raises(RuntimeError, match="need a row_finetune"):
        op(x, layer.base_weight, [slot.section] * 2, [slot.offsets] * 2, None, None, 64, 64)
    with pytest.raises(RuntimeError, match=r"bias must be \[128\]"):
        op(x, layer.base_weight, [slot.section], [slot.offsets], None, torch.zeros(64).bfloat16().cuda(), 64, 64)
    monkeypatch.setenv("XORGEMM_CUDA_PATH", "fastest")
    with pytest.raises(RuntimeError, match="XORGEMM_CUDA_PATH must be fused, blocks or auto"):
        layer(x, finetune="ft")
    monkeypatch.setenv("XORGEMM_CUDA_PATH", "fused")
    fp32 = XorLinear(base.float().cuda())
    fp32.add_finetune("ft", perturb(base.float(), "dense").cuda())
    with pytest.raises(RuntimeError, match="cannot serve this call: the weight is not bf16 or fp16"):
        fp32(x.float(), finetune="ft")


def grouped_layer(n=520, k=1024, d=4, seed=11):
    """A bf16 layer with fine-tunes of every delta kind; at 520x1024 the fused kernel splits the reduction
    (16 tiles, 4 splits on any H100/H200), so these cases run the split-K epilogue and sparse corrections."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    fts = [perturb(base, DELTA_KINDS[i % len(DELTA_KINDS)], seed=seed + i, magnitude=1e-2) for i in range(d)]
    layer = XorLinear(base.cuda())
    for i, f in enumerate(fts):
        layer.add_finetune(f"f{i}", f.cuda())
    return base, fts, layer


def test_grouped_split_k_small(monkeypatch):
    """The compute-sanitizer's grouped case with split-K and sparse corrections (device script)."""
    monkeypatch.setenv("XORGEMM_CUDA_PATH", "fused")
    base, fts, layer = grouped_layer()
    ids = torch.tensor([3, -1, 0, 1, 2, 0, 3])
    x = torch.randn(7, base.shape[1], generator=torch.Generator().manual_seed(1)).bfloat16()
    y = layer(x.cuda(), finetune=ids.cuda())
    weights = [base] + fts
    for r in range(7):
        assert rel_err(y[r], x[r].double() @ weights[ids[r] + 1].double().T) < 1e-2


def test_rows_do_not_depend_on_their_batch(monkeypatch):
    """A row's bits are the same alone, in smaller batches and beside other fine-tunes' rows, and a call
    repeated gives the same bits (the split-K counters are back at zero after every launch)."""
    monkeypatch.setenv("XORGEMM_CUDA_PATH", "fused")
    base, fts, layer = grouped_layer()
    m = 300
    g = torch.Generator().manual_seed(2)
    x = torch.randn(m, base.shape[1], generator=g).bfloat16().cuda()
    ids = (torch.randint(0, 5, (m,), generator=g) - 1).cuda()
    whole = layer(x, finetune=ids)
    assert torch.equal(layer(x, finetune=ids).view(torch.int16), whole.view(torch.int16))
    for lo, hi in ((0, 1), (3, 9), (5, 70), (100, 300)):
        part = layer(x[lo:hi], finetune=ids[lo:hi])
        assert torch.equal(part.view(torch.int16), whole[lo:hi].view(torch.int16)), (lo, hi)


def test_cuda_graph_replays_a_split_k_grouped_call(monkeypatch):
    """Captured once (after a warm-up call, as serving engines do), replayed twice on new inputs: the same
    bits as eager calls, two launches a call and counters that need no reset between replays."""
    monkeypatch.setenv("XORGEMM_CUDA_PATH", "fused")
    base, fts, layer = grouped_layer()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, base.shape[1], generator=g).bfloat16().cuda()
    ids = torch.tensor([i % 5 - 1 for i in range(16)]).cuda()
    layer(x, finetune=ids)  # warm-up: workspaces sized, shared memory opted in
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x, finetune=ids)
    for seed in (4, 5):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y.view(torch.int16), layer(x, finetune=ids).view(torch.int16))


def test_one_finetunes_inf_weight_reaches_only_its_rows(monkeypatch):
    """A tenant whose fine-tuned weight holds an Inf may get non-finite outputs; every other row stays finite
    and right, whatever row slice it shares with that tenant's rows."""
    monkeypatch.setenv("XORGEMM_CUDA_PATH", "fused")
    g = torch.Generator().manual_seed(6)
    base = (torch.randn(136, 512, generator=g) * 0.05).bfloat16()
    bad = perturb(base, "sparse", seed=1, magnitude=1e-2)
    bad[70, 3] = float("inf")
    good = perturb(base, "dense", seed=2, magnitude=1e-2)
    layer = XorLinear(base.cuda())
    layer.add_finetune("bad", bad.cuda())
    layer.add_finetune("good", good.cuda())
    ids = torch.tensor([0, 1, -1, 0, 1, 1, -1, 0] * 3)
    x = torch.randn(len(ids), 512, generator=g).bfloat16()
    y = layer(x.cuda(), finetune=ids.cuda()).cpu()
    for r, f in enumerate(ids.tolist()):
        if f == 0:
            continue
        w = base if f == -1 else good
        assert torch.isfinite(y[r]).all(), r
        assert rel_err(y[r], x[r].double() @ w.double().T) < 1e-2, r

"""GPU tests of slot tables (XorLinear.enable_slots, torch.ops.xorgemm.xor_linear_slots): the fused kernel
reading the table on the device gives the bits of the same fine-tunes passed as lists, and a CUDA graph
captured once replays with whatever the slots hold at replay time. They run where a GPU and the op's CUDA
kernel exist and skip elsewhere (the kernel's reading of the table is emulated in tests/cpp on the CPU)."""
import pytest
import torch
from helpers import rel_err

from xorgemm import SlotIds, XorLinear
from xorgemm._native import has_kernel
from xorgemm.testing import DELTA_KINDS, perturb

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or not has_kernel("cuda"),
                                 reason="needs a CUDA GPU and the op's CUDA kernel")]


def slot_layer(dtype=torch.bfloat16, n=520, k=1024, d=4, seed=21):
    """A layer on the GPU with fine-tunes f0..f{d-1} of every delta kind, each with its own bias; the CPU
    weights and biases, base first. At 520x1024 the fused kernel splits the reduction (split-K epilogue)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    b0 = (torch.randn(n, generator=g) * 0.1).to(dtype)
    layer = XorLinear(base.cuda(), b0.cuda())
    weights, biases = [base], [b0]
    for i in range(d):
        w = perturb(base, DELTA_KINDS[i % len(DELTA_KINDS)], seed=seed + i, magnitude=1e-2)
        b = (b0 + 0.01 * (i + 1)).to(dtype)
        layer.add_finetune(f"f{i}", w.cuda(), b.cuda())
        weights.append(w)
        biases.append(b)
    return layer, weights, biases


def fill(layer, held):
    for s, name in enumerate(held):
        layer.set_slot(s, name)


def test_slot_table_gives_the_bits_of_listed_finetunes(monkeypatch):
    monkeypatch.setenv("XORGEMM_CUDA_PATH", "fused")
    layer, weights, biases = slot_layer()
    layer.enable_slots(6)
    held = ["f3", None, "f0", "f1", "f2", "f0"]
    fill(layer, held)
    ids = torch.tensor([i % 7 - 1 for i in range(40)])
    x = torch.randn(40, 1024, generator=torch.Generator().manual_seed(1)).bfloat16().cuda()
    got = layer(x, finetune=SlotIds(ids.cuda()))
    as_ids = torch.tensor([-1 if s < 0 or held[s] is None else int(held[s][1:]) for s in ids.tolist()])
    # A row's bits do not depend on its batch or group, so slots give exactly the listed call's outputs.
    assert torch.equal(got.view(torch.int16), layer(x, finetune=as_ids.cuda()).view(torch.int16))
    for r, f in enumerate(as_ids.tolist()):
        want = x[r].cpu().double() @ weights[f + 1].double().T + biases[f + 1].double()
        assert rel_err(got[r], want) < 1e-2, r


def test_cuda_graph_replays_with_the_slots_of_replay_time(monkeypatch):
    """vLLM captures its steps once at start, before any adapter: a graph captured over empty slots must
    serve fine-tunes put in them later, and changes of slot between replays."""
    monkeypatch.setenv("XORGEMM_CUDA_PATH", "fused")
    layer, _, _ = slot_layer()
    layer.enable_slots(3)
    x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(2)).bfloat16().cuda()
    slots = torch.tensor([i % 4 - 1 for i in range(16)]).cuda()  # a persistent ids buffer, as vLLM's
    ids = SlotIds(slots)
    layer(x, finetune=ids)  # warm-up: workspaces sized, shared memory opted in
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x, finetune=ids)
    for held, seed in ((["f0", "f1", "f2"], 3), (["f3", None, "f0"], 4), ([None, "f2", "f2"], 5)):
        fill(layer, held)
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).bfloat16())
        slots.copy_(slots.roll(1))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y.view(torch.int16), layer(x, finetune=ids).view(torch.int16)), held


def test_fp32_slots_run_eagerly_and_refuse_capture():
    """fp32 weights take the patched-block path, which reads the table on the host: right eagerly, and a
    clear error (not a broken graph) inside a capture."""
    layer, weights, biases = slot_layer(torch.float32, n=136, k=200, d=2)
    layer.enable_slots(2)
    fill(layer, ["f1", "f0"])
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(6)).cuda()
    ids = SlotIds(torch.tensor([0, 1, -1, 0, 1]).cuda())
    got = layer(x, finetune=ids)
    for r, f in enumerate([1, 0, -1, 1, 0]):
        want = x[r].cpu().double() @ weights[f + 1].double().T + biases[f + 1].double()
        assert rel_err(got[r], want) < 1e-5, r
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph here"):
        with torch.cuda.graph(graph):
            layer(x, finetune=ids)


def test_removing_a_finetune_under_a_graph_serves_the_base(monkeypatch):
    """An evicted fine-tune's slot is emptied before its memory is freed: a replay reads no freed section."""
    monkeypatch.setenv("XORGEMM_CUDA_PATH", "fused")
    layer, _, _ = slot_layer(d=2)
    layer.enable_slots(2)
    fill(layer, ["f0", "f1"])
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(7)).bfloat16().cuda()
    ids = SlotIds(torch.tensor([0, 1, 0, -1]).cuda())
    layer(x, finetune=ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x, finetune=ids)
    layer.remove_finetune("f0")
    torch.cuda.empty_cache()
    graph.replay()
    torch.cuda.synchronize()
    base_rows = layer(x[[0, 2, 3]], finetune=None)
    assert torch.equal(y[[0, 2, 3]].view(torch.int16), base_rows.view(torch.int16))

"""XorLinear's slot table (enable_slots / set_slot / SlotIds) and torch.ops.xorgemm.xor_linear_slots: each row
gets the fine-tune its slot holds, exactly as when the fine-tune is named, and changing the slots changes
nothing about the call (what lets a captured CUDA graph replay with new fine-tunes: tests/test_cuda_slots.py
on a GPU, the kernel's own reading of the table under the emulation in tests/cpp)."""
import copy
import gc

import pytest
import torch
from helpers import DEVICES
from torch.utils._python_dispatch import TorchDispatchMode

from xorgemm import InputError, SlotIds, XorLinear
from xorgemm.testing import perturb


def layer_with(dtype=torch.bfloat16, n=136, k=200, bias=True, device="cpu", seed=0):
    """A layer with fine-tunes f0 (dense), f1 (sparse), f2 (one tile row), each with its own bias; and their
    full weights and biases, base first."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    b0 = (torch.randn(n, generator=g) * 0.1).to(dtype) if bias else None
    weights, biases = [base], [b0]
    layer = XorLinear(base.to(device), None if b0 is None else b0.to(device))
    for i, kind in enumerate(("dense", "sparse", "structured")):
        w = perturb(base, kind, seed=seed + i + 1, magnitude=1e-2)
        b = None if b0 is None else (b0 + 0.01 * (i + 1)).to(dtype)
        layer.add_finetune(f"f{i}", w.to(device), None if b is None else b.to(device))
        weights.append(w)
        biases.append(b)
    return layer, weights, biases


def by_name(layer, x, names):
    """Each row through its fine-tune named (None: the base), one row at a time."""
    return torch.cat([layer(x[i:i + 1], finetune=n) if n else layer(x[i:i + 1], finetune=None)
                      for i, n in enumerate(names)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_each_row_gets_the_finetune_its_slot_holds(device, dtype):
    layer, _, _ = layer_with(dtype, device=device)
    layer.enable_slots(5)
    held = ["f2", None, "f0", "f1", "f0"]
    for s, name in enumerate(held):
        layer.set_slot(s, name)
    ids = torch.tensor([0, 1, 2, 3, 4, -1, 2, 0, 3, 4, 1, -1, 0])
    x = torch.randn(len(ids), 200, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    got = layer(x, finetune=SlotIds(ids.to(device)))
    # The same rows as per-row ids over the fine-tunes' own order (f0's rows, in two slots, are two groups
    # there: a GEMM of another height may round differently, so close, not equal).
    as_ids = torch.tensor([-1 if s < 0 or held[s] is None else int(held[s][1]) for s in ids.tolist()])
    torch.testing.assert_close(got, layer(x, finetune=as_ids.to(device)))
    want = by_name(layer, x, [None if s < 0 else held[s] for s in ids.tolist()])
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_leading_dimensions_and_ids_per_sequence():
    layer, _, _ = layer_with()
    layer.enable_slots(2)
    layer.set_slot(0, "f0")
    layer.set_slot(1, "f1")
    x = torch.randn(3, 4, 200, generator=torch.Generator().manual_seed(2)).bfloat16()
    ids = torch.tensor([1, -1, 0])  # one slot per sequence, broadcast over its tokens
    got = layer(x, finetune=SlotIds(ids))
    for i, name in enumerate(["f1", None, "f0"]):
        assert torch.equal(got[i], layer(x[i], finetune=name))


class OpCalls(TorchDispatchMode):
    """Records each xorgemm op call: its name and, per tensor argument, its address, shape and dtype."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "xorgemm" in str(func):
            self.calls.append((str(func), [(a.data_ptr(), tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor)
                                           else a for a in args]))
        return func(*args, **(kwargs or {}))


def test_changing_the_slots_changes_nothing_about_the_call():
    """What a CUDA graph freezes is the call: the same op on the same tensors whatever the slots hold, while
    the outputs follow the slots."""
    layer, _, _ = layer_with()
    layer.enable_slots(3)
    x = torch.randn(6, 200, generator=torch.Generator().manual_seed(3)).bfloat16()
    ids = SlotIds(torch.tensor([0, 1, 2, -1, 1, 0]))
    outs, calls = [], []
    for held in (["f0", "f1", None], ["f2", "f0", "f1"], [None, None, None]):
        for s, name in enumerate(held):
            layer.set_slot(s, name)
        with OpCalls() as rec:
            outs.append(layer(x, finetune=ids))
        calls.append(rec.calls)
        names = [None if i < 0 else held[i] for i in ids.ids.tolist()]
        torch.testing.assert_close(outs[-1], by_name(layer, x, names), rtol=1e-2, atol=1e-2)
    assert len(calls[0]) == 1 and calls[0][0][0].startswith("xorgemm.xor_linear_slots")
    assert calls[0] == calls[1] == calls[2]
    assert not torch.equal(outs[0], outs[1])


def test_a_slot_bias_row_follows_its_finetune():
    layer, weights, biases = layer_with(torch.float32)
    layer.enable_slots(2)
    layer.set_slot(1, "f1")
    x = torch.randn(2, 200, generator=torch.Generator().manual_seed(4))
    got = layer(x, finetune=SlotIds(torch.tensor([1, 0])))
    want = torch.stack([x[0].double() @ weights[2].double().T + biases[2].double(),
                        x[1].double() @ weights[0].double().T + biases[0].double()])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_removing_a_finetune_empties_its_slots():
    layer, _, _ = layer_with()
    layer.enable_slots(2)
    layer.set_slot(0, "f1")
    layer.set_slot(1, "f1")
    layer.remove_finetune("f1")
    assert layer.slot_names == [None, None]
    assert int(layer._slot_table.abs().sum()) == 0  # no address of freed memory left behind
    x = torch.randn(2, 200, generator=torch.Generator().manual_seed(5)).bfloat16()
    assert torch.equal(layer(x, finetune=SlotIds(torch.tensor([0, 1]))), layer(x, finetune=None))


def test_a_copied_or_reloaded_layer_rewrites_its_table():
    """The table holds addresses: a deep copy, a state_dict load or a move must never read the old ones."""
    layer, _, _ = layer_with()
    layer.enable_slots(2)
    layer.set_slot(0, "f0")
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(6)).bfloat16()
    ids = SlotIds(torch.tensor([0, -1, 0]))
    want = layer(x, finetune=ids)
    twin = copy.deepcopy(layer)
    del layer
    gc.collect()
    assert torch.equal(twin(x, finetune=ids), want)
    assert not any("slot" in k for k in twin.state_dict())  # addresses are never saved
    fresh, _, _ = layer_with(seed=0)
    fresh.enable_slots(2)
    fresh.set_slot(0, "f0")
    fresh.load_state_dict(twin.state_dict())
    assert torch.equal(fresh(x, finetune=ids), want)
    twin.to("cpu")  # a move: the sections may have new addresses, so the table is rewritten
    assert twin._slots_written_for is None
    assert torch.equal(twin(x, finetune=ids), want)


def test_bad_slot_use_is_a_clear_error():
    layer, _, _ = layer_with()
    x = torch.randn(2, 200).bfloat16()
    with pytest.raises(InputError, match="no slots"):
        layer(x, finetune=SlotIds(torch.tensor([0, 0])))
    with pytest.raises(InputError, match="1 to 64 slots"):
        layer.enable_slots(65)
    layer.enable_slots(2)
    with pytest.raises(InputError, match="slot 2 out of range"):
        layer.set_slot(2, "f0")
    with pytest.raises(InputError, match="unknown fine-tune 'nope'"):
        layer.set_slot(0, "nope")
    with pytest.raises(InputError, match="prefixing the input's rows"):
        layer(x, finetune=SlotIds(torch.tensor([0, 0, 0])))
    with pytest.raises(RuntimeError, match="row 1 asks for fine-tune 2 of 2"):
        layer(x, finetune=SlotIds(torch.tensor([0, 2])))
    with pytest.raises(InputError, match="inference only"):
        layer(x.requires_grad_(), finetune=SlotIds(torch.tensor([0, 1])))
    nobias = XorLinear(torch.zeros(64, 64).bfloat16())
    nobias.add_finetune("b", torch.ones(64, 64).bfloat16(), torch.ones(64).bfloat16())
    nobias.enable_slots(1)
    with pytest.raises(InputError, match="has a bias where the base layer has none"):
        nobias.set_slot(0, "b")


def test_the_op_refuses_a_malformed_table():
    layer, _, _ = layer_with()
    x, ids = torch.randn(2, 200).bfloat16(), torch.tensor([0, -1])
    op = torch.ops.xorgemm.xor_linear_slots
    with pytest.raises(RuntimeError, match=r"\[slots, 3\] int64"):
        op(x, layer.base_weight, torch.zeros(2, 2, dtype=torch.long), ids, None, 64, 64)
    short = torch.tensor([[layer.deltas["f0"].section.data_ptr(), layer.deltas["f0"].offsets.data_ptr(), 8]])
    with pytest.raises(RuntimeError, match="slot 0 of the slot table holds 8 section bytes"):
        op(x, layer.base_weight, short, ids, None, 64, 64)
    with pytest.raises(RuntimeError, match=r"bias must be \[136\] or"):
        op(x, layer.base_weight, torch.zeros(1, 3, dtype=torch.long), ids, torch.zeros(3, 136).bfloat16(), 64, 64)


def test_slots_under_inference_mode():
    """vLLM runs its steps under torch.inference_mode: slots set and rows served there alike."""
    layer, _, _ = layer_with()
    x = torch.randn(2, 200).bfloat16()
    with torch.inference_mode():
        layer.enable_slots(1)
        layer.set_slot(0, "f0")
        y = layer(x, finetune=SlotIds(torch.tensor([0, -1])))
    layer.set_slot(0, "f1")  # outside it, the table made inside is updated in place
    assert torch.equal(y[1], layer(x[1:], finetune=None)[0])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """The schema, the fake kernel (torch.compile) and the registrations agree."""
    layer, _, _ = layer_with(torch.float32 if device == "cpu" else torch.bfloat16, device=device)
    layer.enable_slots(3)
    layer.set_slot(0, "f1")
    layer.set_slot(2, "f0")
    x = torch.randn(2, 3, 200, device=device).to(layer.base_weight.dtype)
    ids = torch.tensor([0, 2, -1, 1, 0, 2], device=device)
    op = torch.ops.xorgemm.xor_linear_slots
    torch.library.opcheck(op, (x, layer.base_weight, layer._slot_table, ids, layer._slot_bias, 64, 64))
    torch.library.opcheck(op, (x, layer.base_weight, layer._slot_table, ids, None, 64, 64))


def test_a_load_rewrites_the_table_at_once_and_a_pickle_keeps_no_address(tmp_path):
    """A captured graph replays without Python: a load that swaps sections must leave the table pointing at
    the new ones before any forward; a saved layer carries no address."""
    layer, _, _ = layer_with()
    layer.enable_slots(2)
    layer.set_slot(0, "f0")
    other, _, _ = layer_with(seed=5)
    layer.load_state_dict(other.state_dict())
    section = layer.deltas["f0"].section
    assert layer._slots_written_for == id(layer)
    assert int(layer._slot_table[0, 0]) == section.data_ptr() and int(layer._slot_table[0, 2]) == section.numel()
    x = torch.randn(2, 200, generator=torch.Generator().manual_seed(8)).bfloat16()
    ids = SlotIds(torch.tensor([0, -1]))
    want = layer(x, finetune=ids)
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert loaded._slot_table is None and loaded.slot_names == ["f0", None]
    assert torch.equal(loaded(x, finetune=ids), want)

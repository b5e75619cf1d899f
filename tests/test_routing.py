"""Per-row routes for modules XorLinear does not serve (xorgemm.serving.routing): RoutedForward, which groups
rows by fine-tune on the host, and SlotForward, which serves per-row slot numbers with the same passes over
the same tensors whatever the slots hold (what the vLLM plugin uses). Both must give every row exactly what
its fine-tune's dense module gives it."""
import pytest
import torch
from torch import nn

from xorgemm import SlotIds
from xorgemm.serving.routing import RoutedForward, SlotForward
from xorgemm.serving.state import ServedModel


class ResidualNorm(nn.Module):
    """Works in place on its inputs and returns a tuple, as vLLM's fused residual RMSNorm does."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x, residual):
        residual.add_(x)
        x.copy_(residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight)
        return x, residual


def served(module, tensors):
    """A ServedModel with fine-tunes "a" (every tensor changed) and "b" (none), and the dense modules."""
    st = ServedModel(finetunes=["a", "b"])
    dense = {"base": module, "b": module}
    tuned = type(module).__new__(type(module))
    tuned.__dict__ = {**module.__dict__, "_parameters": dict(module._parameters)}
    for name in tensors:
        value = getattr(module, name).detach() + 0.5
        st.overrides.add(f"m.{name}", "a", value)
        tuned._parameters[name] = nn.Parameter(value)
    dense["a"] = tuned
    return st, dense


@pytest.mark.parametrize("route", [RoutedForward, SlotForward])
@pytest.mark.parametrize("case", ["embedding", "layernorm", "residual"])
def test_each_row_gets_its_finetunes_module(route, case):
    torch.manual_seed(0)
    module, tensors = {"embedding": (nn.Embedding(50, 8), ["weight"]),
                       "layernorm": (nn.LayerNorm(8), ["weight", "bias"]),
                       "residual": (ResidualNorm(8), ["weight"])}[case]
    st, dense = served(module, tensors)
    inputs = ((torch.randint(0, 50, (6,)),) if case == "embedding" else
              (torch.randn(6, 8),) if case == "layernorm" else (torch.randn(6, 8), torch.randn(6, 8)))
    ids = torch.tensor([0, -1, 1, 0, 0, -1])
    names = {0: "a", 1: "b", -1: "base"}
    want = [dense[names[i]](*[t[r:r + 1].clone() for t in inputs]) for r, i in enumerate(ids.tolist())]
    if route is SlotForward:  # slots 0 and 3 hold "a", 2 holds "b", 1 none: ids as slots
        routed = SlotForward.install_slots(module, st, "m", 4)
        for slot, name in ((0, "a"), (2, "b"), (3, "a")):
            routed.set_slot(slot, name)
        selection = SlotIds(torch.tensor([0, 1, 2, 3, 0, -1]))
    else:
        routed = route.install(module, st, "m")
        for name in tensors:
            routed.tensors[name] = f"m.{name}"
        selection = ids
    with torch.no_grad(), st.choosing(selection):
        got = module(*[t.clone() for t in inputs])
    for r in range(6):
        if isinstance(got, tuple):
            for g, w in zip(got, want[r]):
                assert torch.equal(g[r], w[0]), f"row {r}"
        else:
            assert torch.equal(got[r], want[r][0]), f"row {r}"
    assert torch.equal(module.weight, dense["base"].weight), "the base's tensors are back after the call"


def test_slot_passes_are_the_same_whatever_the_slots_hold():
    """A captured graph replays the passes of its capture: one for the base and one per slot, in slot order
    (under tensor parallelism each may end in a collective, which must pair up across ranks), each reading
    its slot's own tensor, whether the slot holds a fine-tune or not."""
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            seen.append((self.weight.data_ptr(), self.weight[0].item()))
            return x * self.weight

    module, st = Recorder(), ServedModel(finetunes=["a", "b"])
    for name, value in (("a", 1.0), ("b", 2.0)):
        st.overrides.add("m.weight", name, torch.full((2,), value))
    routed = SlotForward.install_slots(module, st, "m", 3)
    passes = []
    for held in ((None, None, None), ("b", "a", None), ("a", None, "b")):
        for slot, name in enumerate(held):
            routed.set_slot(slot, name)
        seen.clear()
        with torch.no_grad(), st.choosing(SlotIds(torch.tensor([0, 1, -1]))):
            out = module(torch.ones(3, 2))
        values = {None: 0.0, "a": 1.0, "b": 2.0}
        assert [v for _, v in seen] == [0.0] + [values[n] for n in held]
        assert out[:, 0].tolist() == [values[held[0]], values[held[1]], 0.0]
        passes.append([p for p, _ in seen])
    assert passes[0] == passes[1] == passes[2], "the same tensors in every pass"


def test_slots_made_under_inference_mode_are_written_outside_it():
    """vLLM may build its LoRA modules under torch.inference_mode and evict fine-tunes outside it."""
    module, st = nn.LayerNorm(4), ServedModel(finetunes=["a"])
    st.overrides.add("m.weight", "a", torch.full((4,), 2.0))
    with torch.inference_mode():
        routed = SlotForward.install_slots(module, st, "m", 2)
    routed.set_slot(0, "a")
    routed.set_slot(0, None)
    with torch.inference_mode():
        routed.set_slot(1, "a")
    assert torch.equal(routed.slot_values["weight"][1], torch.full((4,), 2.0))
    assert torch.equal(routed.slot_values["weight"][0], module.weight.detach())


def test_slots_route_a_function_that_reads_the_module():
    """An embedding's local lookup routed instead of its forward (whose all-reduce must follow the rows'
    choice): the function is called per slot with that slot's tensors in place."""
    module, st = nn.Embedding(10, 3), ServedModel(finetunes=["a"])
    st.overrides.add("m.weight", "a", torch.full((10, 3), 7.0))

    class Lookup:
        def embedding(self, layer, ids):
            return torch.nn.functional.embedding(ids, layer.weight)

    method = Lookup()
    routed = SlotForward.install_slots(module, st, "m", 2, method, "embedding")
    routed.set_slot(1, "a")
    ids = torch.tensor([1, 2, 3])
    with torch.no_grad(), st.choosing(SlotIds(torch.tensor([1, -1, 0]))):
        out = method.embedding(module, ids)
    assert torch.equal(out[0], torch.full((3,), 7.0)) and torch.equal(out[1], module.weight[2].detach())
    assert torch.equal(out[2], module.weight[3].detach())

"""Per-row routes for modules XorLinear does not serve (xorgemm.serving.routing): RoutedForward, which groups
rows by fine-tune on the host, and SelectedForward, which never reads the ids on the host (what the vLLM
plugin uses). Both must give every row exactly what its fine-tune's dense module gives it."""
import pytest
import torch
from torch import nn

from xorgemm.serving.routing import RoutedForward, SelectedForward
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


@pytest.mark.parametrize("route", [RoutedForward, SelectedForward])
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
    routed = route.install(module, st, "m")
    for name in tensors:
        routed.tensors[name] = f"m.{name}"
    with torch.no_grad(), st.choosing(ids):
        got = module(*[t.clone() for t in inputs])
    for r in range(6):
        if isinstance(got, tuple):
            for g, w in zip(got, want[r]):
                assert torch.equal(g[r], w[0]), f"row {r}"
        else:
            assert torch.equal(got[r], want[r][0]), f"row {r}"
    assert torch.equal(module.weight, dense["base"].weight), "the base's tensors are back after the call"


def test_selected_passes_run_in_name_order_whatever_the_load_order():
    """Under tensor parallelism each pass may end in a collective (a vocabulary-parallel embedding's all-reduce),
    and ranks may load the same fine-tunes in different orders: the passes must run in one order everywhere."""
    seen = []

    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            seen.append(self.weight[0].item())
            return x * self.weight

    for order in (["b", "a"], ["a", "b"]):
        module, st = Recorder(), ServedModel(finetunes=list(order))
        for name, value in (("a", 1.0), ("b", 2.0)):
            st.overrides.add("m.weight", name, torch.full((2,), value))
        SelectedForward.install(module, st, "m").tensors["weight"] = "m.weight"
        seen.clear()
        with torch.no_grad(), st.choosing(torch.tensor([0, 1, -1])):
            module(torch.ones(3, 2))
        assert seen == [0.0, 1.0, 2.0], f"load order {order}: passes ran {seen}"

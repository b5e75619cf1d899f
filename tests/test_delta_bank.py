"""The delta bank: fine-tunes added to and removed from a served model at run time, over one untouched base,
with their resident memory accounted. (On a GPU the same calls keep everything on the device.)"""
import copy

import pytest
import torch
from helpers import close, finetuned_copy, pack_models
from torch import nn

import xorgemm
from xorgemm import XorLinear
from xorgemm.testing import state_dict_of


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x))))


@pytest.fixture
def zoo(tmp_path):
    torch.manual_seed(0)
    base = Net().eval()
    fts = {
        # no Linear weight changed: a dense bias copy at first
        "bias_only": finetuned_copy(base, 1, names={"down.bias"}),
        "up": finetuned_copy(base, 2, names={"up.weight", "up.bias"}),
        "all": finetuned_copy(base, 3, names={"up.weight", "down.weight", "down.bias"}),
        "norm": finetuned_copy(base, 4, names={"up.weight", "norm.weight"}),  # a LayerNorm change: a dense copy
    }
    paths = {n: pack_models(tmp_path, base, f, n) for n, f in fts.items()}
    return base, fts, paths


def test_add_one_by_one_matches_the_dense_models(zoo):
    base, fts, paths = zoo
    model = copy.deepcopy(base)
    weight_ptr = model.up.weight.data_ptr()
    x = torch.randn(6, 64)
    for name in ("bias_only", "up", "all"):  # they agree on every tensor outside the Linear layers
        xorgemm.add_finetune(model, name, paths[name])
        with torch.no_grad():
            for done in model.xorgemm.finetunes:  # every fine-tune added so far still serves exactly
                with xorgemm.use(model, done):
                    assert close(model(x), fts[done](x)), (name, done)
            with xorgemm.use(model, None):
                assert close(model(x), base(x))
    assert isinstance(model.up, XorLinear) and isinstance(model.down, XorLinear)
    assert model.up.base_weight.data_ptr() == weight_ptr  # the base is shared, never copied
    # "bias_only" changed down.bias before down became an XorLinear: its bias moved into the layer.
    assert "down.bias" not in model.xorgemm.overrides.tuned
    ids = torch.tensor([2, -1, 0, 1, 2, 0])
    with torch.no_grad(), xorgemm.use(model, ids):
        y = model(x)
    refs = [base] + [fts[n] for n in model.xorgemm.finetunes]
    for r in range(6):
        assert close(y[r], refs[ids[r] + 1](x[r:r + 1])[0])


def test_remove_frees_and_keeps_the_others(zoo):
    base, fts, paths = zoo
    paths = {n: p for n, p in paths.items() if n != "norm"}
    model = xorgemm.patch_model(copy.deepcopy(base), paths)
    before = xorgemm.memory_report(model)
    assert set(before.finetune_bytes) == set(paths)
    assert before.finetune_bytes["all"] > before.finetune_bytes["up"] > 0
    assert before.base_bytes == sum(p.numel() * p.element_size() for p in base.parameters())
    xorgemm.select(model, "up")
    xorgemm.remove_finetune(model, "bias_only")
    assert model.xorgemm.finetunes == ["up", "all"] and model.up.finetunes == ["up", "all"]
    assert model.xorgemm.active == "up"  # the selection survives the removal of another fine-tune
    after = xorgemm.memory_report(model)
    assert after.finetune_bytes == {k: v for k, v in before.finetune_bytes.items() if k != "bias_only"}
    x = torch.randn(3, 64)
    with torch.no_grad():
        for n in ("up", "all"):
            with xorgemm.use(model, n):
                assert close(model(x), fts[n](x))
        with xorgemm.use(model, torch.tensor([1, 0, -1])):  # ids moved down by one
            y = model(x)
        assert close(y[0], fts["all"](x[:1])[0]) and close(y[2], base(x[2:])[0])
    xorgemm.remove_finetune(model, "up")
    assert model.xorgemm.active is None
    xorgemm.add_finetune(model, "up", paths["up"])  # the name is free again
    with torch.no_grad(), xorgemm.use(model, "up"):
        assert close(model(x), fts["up"](x))


def test_memory_report_counts_what_is_resident(zoo):
    base, _, paths = zoo
    model = xorgemm.patch_model(copy.deepcopy(base), {"norm": paths["norm"]})
    rep = xorgemm.memory_report(model)
    s = model.up.deltas["norm"]
    assert s.bias is None  # up.bias unchanged: the base bias serves it, nothing resident
    sections = s.section.numel() + s.offsets.numel() * 8
    dense = 64 * 4  # norm.weight, kept as a dense copy
    assert rep.finetune_bytes["norm"] == sections + dense
    assert rep.device == "cpu" and rep.free_bytes and rep.more_that_fit >= 1
    assert "room for about" in str(rep) and "norm:" in str(rep)


def test_bad_additions_change_nothing(zoo, tmp_path):
    base, fts, paths = zoo
    model = xorgemm.patch_model(copy.deepcopy(base), {"up": paths["up"]})
    with pytest.raises(xorgemm.InputError, match="already served"):
        xorgemm.add_finetune(model, "up", paths["all"])
    other = Net()
    wrong = pack_models(tmp_path, other, finetuned_copy(other, 9, names={"up.weight"}), "wrong")
    with pytest.raises(xorgemm.BaseMismatchError):
        xorgemm.add_finetune(model, "wrong", wrong)
    assert model.xorgemm.finetunes == ["up"] and model.up.finetunes == ["up"]
    with pytest.raises(xorgemm.InputError, match="unknown fine-tune"):
        xorgemm.remove_finetune(model, "nope")
    with pytest.raises(xorgemm.InputError, match="not patched"):
        xorgemm.remove_finetune(Net(), "up")


def test_base_is_hashed_once_per_model(zoo, monkeypatch):
    base, _, paths = zoo
    import xorgemm.serving.patch as patch

    calls = []
    real = patch.digest
    monkeypatch.setattr(patch, "digest", lambda t: calls.append(t.shape) or real(t))
    model = xorgemm.patch_model(copy.deepcopy(base), {"up": paths["up"]})
    first = len(calls)
    assert first > 0
    xorgemm.add_finetune(model, "all", paths["all"])
    xorgemm.add_finetune(model, "bias_only", paths["bias_only"])
    # Only tensors no earlier delta listed get hashed now (pack lists every tensor: none here).
    assert len(calls) == first


def test_bank_bad_inputs_are_clear_errors(zoo, tmp_path):
    base, fts, paths = zoo
    model = xorgemm.patch_model(copy.deepcopy(base), {"up": paths["up"]})
    with pytest.raises(xorgemm.InputError, match="non-empty string"):
        xorgemm.add_finetune(model, "", paths["all"])
    # A fine-tune that stores up.weight whole (another shape) cannot join a layer already an XorLinear.
    reshaped = {k: v.clone() for k, v in state_dict_of(base).items()}
    reshaped["up.weight"] = torch.randn(64, 128)
    path = tmp_path / "reshaped.xor.safetensors"
    xorgemm.pack(state_dict_of(base), reshaped, path)
    with pytest.raises(xorgemm.InputError, match="stored whole .*already served by an XorLinear"):
        xorgemm.add_finetune(model, "reshaped", path)
    assert model.xorgemm.finetunes == ["up"] and model.up.finetunes == ["up"] and model.down.__class__ is nn.Linear
    # Patched in with the others, it keeps up as nn.Linear, and the report says the weight is stored whole.
    both = xorgemm.patch_model(copy.deepcopy(base), {"up": paths["up"], "reshaped": path})
    assert type(both.up) is nn.Linear and "up" in both.xorgemm.report.skipped
    assert both.xorgemm.report.dense["up.weight"] == ["up", "reshaped (stored whole: reshaped)"]
    with pytest.raises(xorgemm.InputError, match="not patched"):
        xorgemm.memory_report(Net())
    with pytest.raises(xorgemm.InputError, match="unknown fine-tune"):
        model.up.remove_finetune("nope")
    with pytest.raises(xorgemm.InputError, match="already in this XorLinear"):
        model.up.add_unchanged("up")

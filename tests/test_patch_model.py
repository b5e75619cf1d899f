"""patch_model on plain PyTorch modules and on a Hugging Face model built from a config (no download)."""
import copy

import pytest
import torch
from helpers import close, finetuned_copy, pack_models
from torch import nn

import xorgemm
from xorgemm import XorLinear
from xorgemm.testing import seed_scenario


class MLP(nn.Module):
    def __init__(self, d=96, h=160):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


def test_seed_layer_single_finetune(tmp_path):
    base, ft = seed_scenario()
    path = pack_models(tmp_path, base, ft, "seed")
    patched = xorgemm.patch_model(copy.deepcopy(base), {"seed": path}, active="seed")
    rep = patched.xorgemm.report
    assert sorted(rep.replaced) == ["ff.0", "ff.2"]
    assert "self_attn.out_proj" in rep.skipped  # nn.MultiheadAttention reads its weight directly
    assert "self_attn.in_proj_weight" in rep.dense and "ln1.weight" in rep.dense
    x = torch.randn(4, 16, 64)
    with torch.no_grad():
        assert close(patched(x), ft(x))
        with xorgemm.use(patched, None):
            assert close(patched(x), base(x))
        assert close(patched(x), ft(x))  # the previous choice is back


def test_base_weight_storage_is_shared(tmp_path):
    base = MLP()
    path = pack_models(tmp_path, base, finetuned_copy(base, 1), "a")
    ptr = base.up.weight.data_ptr()
    patched = xorgemm.patch_model(base, path)
    assert isinstance(patched.up, XorLinear) and patched.up.base_weight.data_ptr() == ptr


def test_mixed_rows_of_several_finetunes(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(MLP(), MLP())
    fts = {n: finetuned_copy(base, i + 1, only_linear=True) for i, n in enumerate(["legal", "med", "code"])}
    paths = {n: pack_models(tmp_path, base, m, n) for n, m in fts.items()}
    patched = xorgemm.patch_model(copy.deepcopy(base), paths)
    assert len(patched.xorgemm.report.replaced) == 4
    x = torch.randn(6, 5, 96)
    ids = torch.tensor([0, 1, 2, -1, 1, 0])
    with torch.no_grad(), xorgemm.use(patched, ids):
        y = patched(x)
    refs = [base] + list(fts.values())
    for row, i in enumerate(ids.tolist()):
        with torch.no_grad():
            assert close(y[row], refs[i + 1](x[row:row + 1])[0])


def test_mixed_rows_refused_when_other_tensors_differ(tmp_path):
    base = MLP()
    paths = {n: pack_models(tmp_path, base, finetuned_copy(base, i + 1), n) for i, n in enumerate(["a", "b"])}
    patched = xorgemm.patch_model(copy.deepcopy(base), paths)
    with pytest.raises(xorgemm.InputError, match="differ in 'norm"):
        xorgemm.select(patched, torch.tensor([0, 1]))
    xorgemm.select(patched, torch.tensor([1, 1]))  # one fine-tune per batch is always fine


def test_refuses_a_delta_for_another_base(tmp_path):
    base = MLP()
    path = pack_models(tmp_path, base, finetuned_copy(base, 1), "a")
    other = finetuned_copy(base, 9)
    with pytest.raises(xorgemm.BaseMismatchError, match="base bytes do not match"):
        xorgemm.patch_model(other, path)
    with pytest.raises(xorgemm.BaseMismatchError, match="no such tensor"):
        xorgemm.patch_model(nn.Sequential(nn.Linear(96, 96)), path)


def test_unknown_finetune_and_unpatched_model(tmp_path):
    base = MLP()
    patched = xorgemm.patch_model(copy.deepcopy(base), {"a": pack_models(tmp_path, base, finetuned_copy(base, 1), "a")})
    with pytest.raises(xorgemm.InputError, match="unknown fine-tune 'b'"):
        xorgemm.select(patched, "b")
    with pytest.raises(xorgemm.InputError, match="-1..0"):
        xorgemm.select(patched, torch.tensor([0, 4]))
    with pytest.raises(xorgemm.InputError, match="not patched"):
        xorgemm.select(MLP(), "a")


transformers = pytest.importorskip("transformers")


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=40)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_hugging_face_model_same_logits_as_dense_finetune(tmp_path):
    base = tiny_bert()
    ft = finetuned_copy(base, 3)  # everything changes: embeddings, norms, linears, classifier
    path = pack_models(tmp_path, base, ft, "ft")
    patched = xorgemm.patch_model(copy.deepcopy(base), {"ft": path}, active="ft")
    assert len(patched.xorgemm.report.replaced) == 2 * 6 + 2  # q,k,v,o,up,down per layer + pooler + classifier
    ids = torch.randint(0, 120, (3, 12))
    with torch.no_grad():
        got = patched(input_ids=ids).logits
        want = ft(input_ids=ids).logits
        assert close(got, want)
        with xorgemm.use(patched, None):
            assert close(patched(input_ids=ids).logits, base(input_ids=ids).logits)


def test_hugging_face_model_mixed_batch(tmp_path):
    base = tiny_bert()
    fts = [finetuned_copy(base, s, only_linear=True) for s in (4, 5)]
    patched = xorgemm.patch_model(copy.deepcopy(base), {f"f{i}": pack_models(tmp_path, base, m, f"f{i}")
                                                        for i, m in enumerate(fts)})
    ids = torch.randint(0, 120, (3, 12))
    rows = torch.tensor([1, -1, 0])
    with torch.no_grad(), xorgemm.use(patched, rows):
        got = patched(input_ids=ids).logits
    refs = [base] + fts
    with torch.no_grad():
        for r, i in enumerate(rows.tolist()):
            assert close(got[r], refs[i + 1](input_ids=ids[r:r + 1]).logits[0], 1e-4)
